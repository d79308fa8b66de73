//! The store's logic, over any [`Backend`]: the database, the write order, quota and
//! eviction, GC, verify. [`DiskStore`](crate::DiskStore) and
//! [`MemStore`](crate::MemStore) are this with blob files and with blob buffers.
//!
//! Locks, always taken in this order: a partial blob's lock, then the database lock;
//! the `partials` and `touched` maps are leaves (never held while taking another lock).
//! Every change to blob files that the database names (install, delete, creating a
//! partial blob's files) happens with the database lock held, so GC, which sweeps files
//! against rows under the same lock, never sees a half-made change.
//!
//! Parts: `add` (staging, inserting packages, manifests to fetch), `fetch` (partial
//! blobs: verified writes, commits, serving), `read`, `quota` (use, eviction, GC),
//! `verify` (and reconciling after a crash), `rows` (the shared SQL).

mod add;
mod fetch;
mod quota;
mod read;
mod rows;
mod verify;

use std::{
    any::Any,
    collections::{HashMap, HashSet},
    fmt,
    io::{self, Read, Write},
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use myconet_content::{
    GroupSet, PackagePath, SignedManifest,
    manifest::Kind,
    verified::{self, Outboard, PAIR_BYTES, VerifiedParent},
};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::{
    BlobSource, BlobStatus, Completeness, Corruption, FileInfo, GcReport, Hash, Hold, OpenReport,
    PackageId, PackageInfo, Problem, Protect, Result, StoreConfig, StoreError, Usage, VerifyReport,
    backend::{Backend, BlobReader, PartialFiles, Staging},
    error::io_err,
    partial::Partial,
    schema,
};

use rows::*;
use verify::reconcile;

/// Tags every [`Staged`] with the store that made it.
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// A blob streamed into the store for an add: its bytes are written and hashed, and
/// its room is reserved against the quota, but nothing names it yet. Hand it to
/// [`Store::insert_package`](crate::Store::insert_package) with the manifest that
/// uses it; dropped instead, its bytes are deleted and its room released.
pub struct Staged {
    hash: Hash,
    size: u64,
    instance: u64,
    /// Bytes reserved in `reservation`; zero once handed over to the database.
    charge: u64,
    staging: Option<Box<dyn Any + Send>>,
    reservation: Arc<AtomicU64>,
}

impl Staged {
    /// The root hash of the data (its verified-streaming root).
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn release(&mut self) {
        self.reservation.fetch_sub(self.charge, Ordering::AcqRel);
        self.charge = 0;
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        self.release();
    }
}

impl fmt::Debug for Staged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Staged")
            .field("hash", &self.hash)
            .field("size", &self.size)
            .finish()
    }
}

/// The database connection and what is derived from it under the same lock.
pub(super) struct Db {
    pub(super) conn: Connection,
    /// `SELECT sum(charge) FROM blobs`, kept in step with every commit so a quota check
    /// is O(1) (a query per staged file would make adding n files O(n²)). Recomputed
    /// on open and by GC.
    pub(super) charged: u64,
}

/// One blob row.
pub(super) struct BlobRow {
    pub(super) blob: i64,
    pub(super) size: u64,
    pub(super) complete: bool,
    pub(super) verified: Option<Vec<u8>>,
    pub(super) unsynced: Option<Vec<u8>>,
}

/// The store over a backend.
pub(crate) struct Core<B: Backend> {
    backend: B,
    db: Mutex<Db>,
    max_bytes: u64,
    protect: Option<Protect>,
    /// Bytes reserved by live [`Staged`] blobs.
    staging: Arc<AtomicU64>,
    instance: u64,
    /// The LRU clock: the last value given to `packages.accessed`.
    clock: AtomicU64,
    /// Accesses not yet written to `packages.accessed` (package row → clock), written
    /// before eviction plans and on close: reading a file must not cost a commit.
    touched: Mutex<HashMap<i64, u64>>,
    /// Partial blobs being written, by hash.
    partials: Mutex<HashMap<Hash, SharedPartial<B>>>,
    open_report: OpenReport,
}

/// An open partial blob, shared by the receives writing it.
type SharedPartial<B> = Arc<Mutex<Partial<<B as Backend>::Partial>>>;

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl<B: Backend> Core<B> {
    /// Opens the store over `conn` and `backend`, migrating the schema and, after an
    /// unclean shutdown, reconciling files with rows.
    pub(crate) fn open(
        backend: B,
        mut conn: Connection,
        in_memory: bool,
        config: StoreConfig,
    ) -> Result<Self> {
        schema::configure(&conn, in_memory, config.max_bytes)?;
        schema::migrate(&mut conn)?;
        let mut report = OpenReport {
            staging_files_deleted: backend.clear_staging()?,
            ..OpenReport::default()
        };
        let clean: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'clean'", [], |r| {
                r.get(0)
            })
            .optional()?;
        report.unclean = clean != Some(1);
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('clean', 0)
             ON CONFLICT (key) DO UPDATE SET value = 0",
            [],
        )?;
        if report.unclean {
            reconcile(&backend, &mut conn, &mut report)?;
        }
        let charged: i64 =
            conn.query_row("SELECT coalesce(sum(charge), 0) FROM blobs", [], |r| {
                r.get(0)
            })?;
        let clock: i64 =
            conn.query_row("SELECT coalesce(max(accessed), 0) FROM packages", [], |r| {
                r.get(0)
            })?;
        let core = Self {
            backend,
            db: Mutex::new(Db {
                conn,
                charged: u64_of(charged),
            }),
            max_bytes: config.max_bytes,
            protect: config.protect,
            staging: Arc::new(AtomicU64::new(0)),
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            clock: AtomicU64::new(u64_of(clock)),
            touched: Mutex::new(HashMap::new()),
            partials: Mutex::new(HashMap::new()),
            open_report: report,
        };
        // A quota lowered since the last run: evict what may be evicted, best effort.
        {
            let mut db = core.lock_db();
            let used = core.used(&db);
            if used > core.max_bytes {
                let plan = core.plan_eviction(&mut db, used - core.max_bytes, &HashSet::new())?;
                core.evict(&mut db, &plan)?;
            }
        }
        Ok(core)
    }

    pub(crate) fn open_report(&self) -> OpenReport {
        self.open_report
    }

    pub(crate) fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub(super) fn lock_db(&self) -> MutexGuard<'_, Db> {
        // A panic while holding the lock left any open transaction rolled back (its
        // drop), and `charged` is only updated after commits: the state is sound.
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn used(&self, db: &Db) -> u64 {
        db.charged
            .saturating_add(self.staging.load(Ordering::Acquire))
            .saturating_add(self.backend.database_bytes(&db.conn))
    }

    pub(super) fn charge_for_blob(&self, size: u64) -> u64 {
        self.backend.charge_for(size) + self.backend.charge_for(verified::outboard_size(size))
    }

    /// What one commit adding `m` may grow the database by: its rows and index
    /// entries (the manifest, which holds every path, about three times over: the
    /// manifest column, file rows, the search index) and the pages a commit touches.
    pub(super) fn database_growth(m: &SignedManifest) -> u64 {
        64 * 1024 + 3 * m.bytes().len() as u64 + 128 * m.manifest().files.len() as u64
    }

    pub(super) fn next_access(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub(super) fn add_holds(&self, db: &mut Db, pkg: i64, holds: &[Hold]) -> Result<()> {
        if holds.is_empty() {
            return Ok(());
        }
        let tx = db.conn.transaction()?;
        insert_holds(&tx, pkg, holds)?;
        tx.commit()?;
        Ok(())
    }

    pub(crate) fn hold(&self, id: &PackageId, hold: Hold) -> Result<()> {
        let mut db = self.lock_db();
        let pkg = find_package(&db.conn, id)?.ok_or(StoreError::UnknownPackage(*id))?;
        self.add_holds(&mut db, pkg, &[hold])
    }

    pub(crate) fn release(&self, id: &PackageId, hold: Hold) -> Result<()> {
        let db = self.lock_db();
        let pkg = find_package(&db.conn, id)?.ok_or(StoreError::UnknownPackage(*id))?;
        db.conn.execute(
            "DELETE FROM holds WHERE pkg = ?1 AND reason = ?2",
            params![pkg, hold.code()],
        )?;
        Ok(())
    }

    pub(crate) fn remove(&self, id: &PackageId) -> Result<u64> {
        let mut db = self.lock_db();
        let pkg = find_package(&db.conn, id)?.ok_or(StoreError::UnknownPackage(*id))?;
        let tx = db.conn.transaction()?;
        let blobs = delete_package_rows(&tx, pkg)?;
        let freed = delete_unused_blobs(&tx, &blobs)?;
        tx.commit()?;
        self.forget_blobs(&mut db, &freed);
        Ok(freed.iter().map(|(_, c)| c).sum())
    }

    pub(super) fn touch_row(&self, pkg: i64) {
        let at = self.next_access();
        self.touched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pkg, at);
    }

    pub(crate) fn touch(&self, id: &PackageId) -> Result<()> {
        let pkg = {
            let db = self.lock_db();
            find_package(&db.conn, id)?.ok_or(StoreError::UnknownPackage(*id))?
        };
        self.touch_row(pkg);
        Ok(())
    }

    /// Writes what is only in memory (pending groups, access times) and marks the
    /// shutdown clean.
    pub(crate) fn close(&self) -> Result<()> {
        self.flush()?;
        let mut db = self.lock_db();
        self.flush_touched(&mut db)?;
        db.conn
            .execute("UPDATE meta SET value = 1 WHERE key = 'clean'", [])?;
        Ok(())
    }
}

impl<B: Backend> Drop for Core<B> {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
