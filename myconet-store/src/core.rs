//! The store's logic, over any [`Backend`]: the database, the write order, quota and
//! eviction, GC, verify. [`DiskStore`](crate::DiskStore) and
//! [`MemStore`](crate::MemStore) are this with blob files and with blob buffers.
//!
//! Locks, always taken in this order: a partial blob's lock, then the database lock;
//! the `partials` and `touched` maps are leaves (never held while taking another lock).
//! Every change to blob files that the database names (install, delete, creating a
//! partial blob's files) happens with the database lock held, so GC, which sweeps files
//! against rows under the same lock, never sees a half-made change.

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
struct Db {
    conn: Connection,
    /// `SELECT sum(charge) FROM blobs`, kept in step with every commit so a quota check
    /// is O(1) (a query per staged file would make adding n files O(n²)). Recomputed
    /// on open and by GC.
    charged: u64,
}

/// One blob row.
struct BlobRow {
    blob: i64,
    size: u64,
    complete: bool,
    verified: Option<Vec<u8>>,
    unsynced: Option<Vec<u8>>,
}

/// What eviction would remove.
#[derive(Default)]
struct EvictionPlan {
    packages: Vec<i64>,
    freed: u64,
    /// Blobs not to free.
    keep: HashSet<i64>,
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

/// Pending bytes after which a partial blob's verified groups are committed *unsynced*
/// (no fsync: what a killed process loses, since the page cache outlives it): 1/256 of
/// the blob, between 256 KiB and 4 MiB.
fn soft_commit_bytes(size: u64) -> u64 {
    (size / 256).clamp(256 << 10, 4 << 20)
}

/// Unsynced bytes after which a partial blob's files are fsynced and its groups
/// committed durably (what a power loss can make us re-verify, and re-fetch if lost):
/// 1/8 of the blob, between 8 MiB and 256 MiB.
fn sync_bytes(size: u64) -> u64 {
    (size / 8).clamp(8 << 20, 256 << 20)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The root hash of the empty file.
fn empty_root() -> Hash {
    Hash::of(&[])
}

/// A reader that remembers whether the failure came from it (not from the writer).
struct TrackedRead<'a> {
    inner: &'a mut dyn Read,
    read: u64,
    failed: bool,
}

impl Read for TrackedRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.read += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }
}

/// Copies what it reads to `copy`, remembering whether the copy failed.
struct Tee<'a, R> {
    inner: &'a mut R,
    copy: &'a mut dyn Write,
    copy_failed: bool,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Err(e) = self.copy.write_all(&buf[..n]) {
            self.copy_failed = true;
            return Err(e);
        }
        Ok(n)
    }
}

/// Compares what is written with the bytes of a reader.
struct CompareWriter<'a> {
    expected: Option<&'a BlobReader>,
    offset: u64,
    equal: bool,
    buf: Vec<u8>,
}

impl Write for CompareWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.equal {
            match self.expected {
                None => self.equal = data.is_empty(),
                Some(r) => {
                    self.buf.resize(data.len(), 0);
                    if r.read_exact_at(self.offset, &mut self.buf).is_err() || self.buf != data {
                        self.equal = false;
                    }
                }
            }
        }
        self.offset += data.len() as u64;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
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

    fn lock_db(&self) -> MutexGuard<'_, Db> {
        // A panic while holding the lock left any open transaction rolled back (its
        // drop), and `charged` is only updated after commits: the state is sound.
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn used(&self, db: &Db) -> u64 {
        db.charged
            .saturating_add(self.staging.load(Ordering::Acquire))
            .saturating_add(self.backend.database_bytes(&db.conn))
    }

    fn charge_for_blob(&self, size: u64) -> u64 {
        self.backend.charge_for(size) + self.backend.charge_for(verified::outboard_size(size))
    }

    /// What one commit adding `m` may grow the database by: its rows and index
    /// entries (the manifest, which holds every path, about three times over: the
    /// manifest column, file rows, the search index) and the pages a commit touches.
    fn database_growth(m: &SignedManifest) -> u64 {
        64 * 1024 + 3 * m.bytes().len() as u64 + 128 * m.manifest().files.len() as u64
    }

    fn next_access(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::AcqRel) + 1
    }

    // ---- quota and eviction ----

    /// Makes room for `needed` more bytes, evicting least recently used cached
    /// packages if that is enough; refuses, evicting nothing, if it is not. The blobs
    /// in `keep` (those the package being stored uses) are never freed.
    fn make_room(&self, db: &mut Db, needed: u64, keep: &HashSet<Hash>) -> Result<()> {
        let used = self.used(db);
        let want = used.saturating_add(needed).saturating_sub(self.max_bytes);
        if want == 0 {
            return Ok(());
        }
        let plan = self.plan_eviction(db, want, keep)?;
        if plan.freed < want {
            return Err(StoreError::Quota {
                max_bytes: self.max_bytes,
                used,
                needed,
                evictable: plan.freed,
            });
        }
        self.evict(db, &plan)
    }

    /// Picks cached, unprotected packages, least recently used first, until evicting
    /// them would free `want` bytes (or every candidate is taken). A blob is freed only
    /// once every package using it is evicted, and a blob in `keep` never is.
    fn plan_eviction(&self, db: &mut Db, want: u64, keep: &HashSet<Hash>) -> Result<EvictionPlan> {
        self.flush_touched(db)?;
        let conn = &db.conn;
        let mut plan = EvictionPlan::default();
        for h in keep {
            if let Some(r) = blob_row(conn, h)? {
                plan.keep.insert(r.blob);
            }
        }
        let mut candidates = conn.prepare_cached(
            "SELECT pkg, id FROM packages p
             WHERE NOT EXISTS (SELECT 1 FROM holds h WHERE h.pkg = p.pkg)
             ORDER BY accessed, pkg",
        )?;
        let mut blobs_of = conn.prepare_cached(
            "SELECT f.blob, b.charge, (SELECT count(DISTINCT f2.pkg) FROM files f2 WHERE f2.blob = f.blob)
             FROM (SELECT DISTINCT blob FROM files WHERE pkg = ?1) f JOIN blobs b ON b.blob = f.blob",
        )?;
        let mut users_left: HashMap<i64, (u64, u64)> = HashMap::new();
        let mut rows = candidates.query([])?;
        while let Some(row) = rows.next()? {
            if plan.freed >= want {
                break;
            }
            let pkg: i64 = row.get(0)?;
            let id = id_from(&row.get::<_, Vec<u8>>(1)?)?;
            if self.protect.as_ref().is_some_and(|p| p(&id)) {
                continue;
            }
            plan.packages.push(pkg);
            let mut blobs = blobs_of.query([pkg])?;
            while let Some(b) = blobs.next()? {
                let blob: i64 = b.get(0)?;
                let charge = u64_of(b.get(1)?);
                let users = u64_of(b.get(2)?);
                let left = users_left.entry(blob).or_insert((users, charge));
                left.0 = left.0.saturating_sub(1);
                if left.0 == 0 && !plan.keep.contains(&blob) {
                    plan.freed += charge;
                }
            }
        }
        Ok(plan)
    }

    /// Deletes the planned packages and the blobs nothing else uses.
    fn evict(&self, db: &mut Db, plan: &EvictionPlan) -> Result<()> {
        if plan.packages.is_empty() {
            return Ok(());
        }
        let tx = db.conn.transaction()?;
        let mut blobs = Vec::new();
        for &pkg in &plan.packages {
            blobs.extend(delete_package_rows(&tx, pkg)?);
        }
        // A kept blob no package names for now is named again by the commit that asked
        // for the room (or, if that fails, collected by GC).
        blobs.retain(|b| !plan.keep.contains(b));
        let freed = delete_unused_blobs(&tx, &blobs)?;
        tx.commit()?;
        self.forget_blobs(db, &freed);
        Ok(())
    }

    /// After a commit that deleted blob rows: the charge and the files go too.
    fn forget_blobs(&self, db: &mut Db, freed: &[(Hash, u64)]) {
        let mut partials = self.partials_map();
        for (hash, charge) in freed {
            partials.remove(hash);
            db.charged = db.charged.saturating_sub(*charge);
            crate::crash_point();
            // A file that cannot be deleted now is an orphan: GC sweeps it later.
            let _ = self.backend.delete(hash);
        }
    }

    fn flush_touched(&self, db: &mut Db) -> Result<()> {
        let touched: Vec<(i64, u64)> = {
            let mut t = self.touched.lock().unwrap_or_else(|e| e.into_inner());
            t.drain().collect()
        };
        if touched.is_empty() {
            return Ok(());
        }
        let tx = db.conn.transaction()?;
        {
            let mut up = tx.prepare_cached(
                "UPDATE packages SET accessed = ?2 WHERE pkg = ?1 AND accessed < ?2",
            )?;
            for (pkg, at) in touched {
                up.execute(params![pkg, i64_of(at)])?;
            }
        }
        tx.commit()?;
        crate::crash_point();
        Ok(())
    }

    // ---- adding ----

    pub(crate) fn stage(&self, data: &mut dyn Read, size: u64) -> Result<Staged> {
        let charge = self.charge_for_blob(size);
        {
            let mut db = self.lock_db();
            self.make_room(&mut db, charge, &HashSet::new())?;
            self.staging.fetch_add(charge, Ordering::AcqRel);
        }
        let mut staged = Staged {
            hash: Hash([0; 32]),
            size,
            instance: self.instance,
            charge,
            staging: None,
            reservation: self.staging.clone(),
        };
        let mut files = self.backend.stage()?;
        let mut source = io::BufReader::with_capacity(
            crate::IO_BUFFER,
            TrackedRead {
                inner: data,
                read: 0,
                failed: false,
            },
        );
        let (hash, copy_failed) = {
            let (d, o) = files.writers();
            let mut tee = Tee {
                inner: &mut source,
                copy: d,
                copy_failed: false,
            };
            (
                verified::compute_outboard(&mut tee, size, o),
                tee.copy_failed,
            )
        };
        let hash = match hash {
            Ok(h) => h,
            Err(e) if source.get_ref().failed => return Err(StoreError::Read(e)),
            Err(e) if copy_failed => return Err(StoreError::Staging(e)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(StoreError::DataTooShort {
                    declared: size,
                    actual: source.get_ref().read,
                });
            }
            Err(e) => return Err(StoreError::Staging(e)),
        };
        loop {
            match io::BufRead::fill_buf(&mut source) {
                Ok([]) => break,
                Ok(_) => return Err(StoreError::DataTooLong { declared: size }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StoreError::Read(e)),
            }
        }
        files.finish().map_err(StoreError::Staging)?;
        crate::crash_point();
        staged.hash = hash;
        staged.staging = Some(Box::new(files));
        Ok(staged)
    }

    pub(crate) fn stage_file(&self, path: &Path) -> Result<Staged> {
        let mut f = std::fs::File::open(path).map_err(io_err("opening", path))?;
        let size = f.metadata().map_err(io_err("reading size of", path))?.len();
        self.stage(&mut f, size).map_err(|e| match e {
            StoreError::Read(source) => io_err("reading", path)(source),
            e => e,
        })
    }

    pub(crate) fn insert_package(
        &self,
        signed: &SignedManifest,
        staged: Vec<Staged>,
        holds: &[Hold],
    ) -> Result<PackageInfo> {
        let manifest = signed.manifest();
        let mut by_hash: HashMap<Hash, Staged> = HashMap::new();
        for s in staged {
            if s.instance != self.instance {
                return Err(StoreError::ForeignStaged(s.hash));
            }
            by_hash.entry(s.hash).or_insert(s);
        }
        for f in &manifest.files {
            match by_hash.get(&f.root) {
                Some(s) if s.size != f.size => {
                    return Err(StoreError::ManifestSizeMismatch {
                        path: f.path.to_string(),
                        manifest: f.size,
                        staged: s.size,
                    });
                }
                _ => check_possible(&f.path, f.root, f.size)?,
            }
        }
        let used_roots: HashSet<Hash> = manifest.files.iter().map(|f| f.root).collect();
        by_hash.retain(|h, _| used_roots.contains(h));
        {
            let to_sync: Vec<&B::Staging> = by_hash
                .values()
                .filter_map(|s| s.staging.as_ref()?.downcast_ref::<B::Staging>())
                .collect();
            self.backend.sync_staged(&to_sync)?;
        }
        crate::crash_point();

        let mut db = self.lock_db();
        // Already here (perhaps partly fetched): the add completes what it can and
        // adds the holds.
        let existing = find_package(&db.conn, &signed.id())?;
        if existing.is_none() {
            let roots: HashSet<Hash> = manifest.files.iter().map(|f| f.root).collect();
            self.make_room(&mut db, Self::database_growth(signed), &roots)?;
        }
        // Which blobs are new, which partial ones the add completes.
        let mut new_blobs: Vec<(Hash, u64)> = Vec::new();
        let mut upgrades: Vec<i64> = Vec::new();
        let mut to_install: Vec<(Hash, Staged, bool)> = Vec::new();
        let mut seen = HashSet::new();
        for f in &manifest.files {
            if !seen.insert(f.root) {
                continue;
            }
            let row = blob_row(&db.conn, &f.root)?;
            if let Some(r) = &row
                && r.size != f.size
            {
                return Err(StoreError::ImpossibleFile {
                    path: f.path.to_string(),
                    hash: f.root,
                    size: f.size,
                });
            }
            match row {
                Some(r) if r.complete => {}
                Some(_) if existing.is_some() && !by_hash.contains_key(&f.root) => {}
                other => {
                    let s = by_hash
                        .remove(&f.root)
                        .ok_or_else(|| StoreError::MissingData {
                            path: f.path.to_string(),
                            hash: f.root,
                        })?;
                    match other {
                        Some(ref r) => upgrades.push(r.blob),
                        None => new_blobs.push((f.root, f.size)),
                    }
                    to_install.push((f.root, s, other.is_none()));
                }
            }
        }
        // Data in place and durable before any row names it.
        let mut installed = Vec::with_capacity(to_install.len());
        let mut release = Vec::with_capacity(to_install.len());
        for (hash, mut s, new) in to_install {
            let files = s
                .staging
                .take()
                .and_then(|b| b.downcast::<B::Staging>().ok())
                .ok_or(StoreError::ForeignStaged(hash));
            if let Err(e) = files.and_then(|f| self.backend.install(*f, &hash)) {
                self.undo_installs(&installed);
                return Err(e);
            }
            installed.push((hash, new));
            release.push(s);
            crate::crash_point();
        }
        let hashes: Vec<Hash> = installed.iter().map(|(h, _)| *h).collect();
        let committed = self.backend.sync_installed(&hashes).and_then(|()| {
            crate::crash_point();
            let tx = db.conn.transaction()?;
            for &(hash, size) in &new_blobs {
                tx.prepare_cached(
                    "INSERT INTO blobs (hash, size, complete, verified, charge) VALUES (?1, ?2, 1, NULL, ?3)",
                )?
                .execute(params![hash.as_bytes(), i64_of(size), i64_of(self.charge_for_blob(size))])?;
            }
            for &blob in &upgrades {
                tx.prepare_cached(
                    "UPDATE blobs SET complete = 1, verified = NULL, unsynced = NULL WHERE blob = ?1",
                )?
                    .execute([blob])?;
            }
            let pkg = match existing {
                Some(pkg) => {
                    insert_holds(&tx, pkg, holds)?;
                    pkg
                }
                None => insert_package_rows(&tx, signed, holds, self.next_access())?,
            };
            tx.commit()?;
            crate::crash_point();
            Ok(pkg)
        });
        let pkg = match committed {
            Ok(pkg) => pkg,
            Err(e) => {
                self.undo_installs(&installed);
                return Err(e);
            }
        };
        for &(_, size) in &new_blobs {
            db.charged += self.charge_for_blob(size);
        }
        if existing.is_some() {
            self.touch_row(pkg);
        }
        // The staged room is now charged to the rows (or, for upgrades, was already).
        for mut s in release {
            s.release();
        }
        // A partial blob this add completed: its writer's files were replaced.
        {
            let mut partials = self.partials_map();
            for (hash, new) in &installed {
                if !new {
                    partials.remove(hash);
                }
            }
        }
        package_info(&db.conn, pkg)
    }

    /// After a failed add: deletes the installed files of blobs that had no row. (Files
    /// that replaced a partial blob hold that blob's exact bytes, so they stay.)
    fn undo_installs(&self, installed: &[(Hash, bool)]) {
        for (h, new) in installed {
            if *new {
                let _ = self.backend.delete(h);
            }
        }
    }

    pub(crate) fn put_manifest(
        &self,
        signed: &SignedManifest,
        holds: &[Hold],
    ) -> Result<PackageInfo> {
        let manifest = signed.manifest();
        for f in &manifest.files {
            check_possible(&f.path, f.root, f.size)?;
        }
        let mut db = self.lock_db();
        if let Some(pkg) = find_package(&db.conn, &signed.id())? {
            self.add_holds(&mut db, pkg, holds)?;
            self.touch_row(pkg);
            return package_info(&db.conn, pkg);
        }
        let mut missing: Vec<(Hash, u64)> = Vec::new();
        let mut seen = HashSet::new();
        for f in &manifest.files {
            if !seen.insert(f.root) {
                continue;
            }
            match blob_row(&db.conn, &f.root)? {
                Some(r) if r.size != f.size => {
                    return Err(StoreError::ImpossibleFile {
                        path: f.path.to_string(),
                        hash: f.root,
                        size: f.size,
                    });
                }
                Some(_) => {}
                None => missing.push((f.root, f.size)),
            }
        }
        let needed: u64 = missing.iter().map(|&(_, s)| self.charge_for_blob(s)).sum();
        let roots: HashSet<Hash> = manifest.files.iter().map(|f| f.root).collect();
        self.make_room(&mut db, needed + Self::database_growth(signed), &roots)?;
        // The empty file is complete as soon as it is named: it has no bytes to verify.
        let empties: Vec<Hash> = missing
            .iter()
            .filter(|&&(_, s)| s == 0)
            .map(|&(h, _)| h)
            .collect();
        for h in &empties {
            let mut s = self.backend.stage()?;
            s.finish().map_err(StoreError::Staging)?;
            self.backend.sync_staged(&[&s])?;
            self.backend.install(s, h)?;
        }
        self.backend.sync_installed(&empties)?;
        crate::crash_point();
        let committed = (|| -> Result<i64> {
            let tx = db.conn.transaction()?;
            for &(hash, size) in &missing {
                tx.prepare_cached(
                    "INSERT INTO blobs (hash, size, complete, verified, charge) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    hash.as_bytes(),
                    i64_of(size),
                    size == 0,
                    (size > 0).then(Vec::<u8>::new),
                    i64_of(self.charge_for_blob(size))
                ])?;
            }
            let pkg = insert_package_rows(&tx, signed, holds, self.next_access())?;
            tx.commit()?;
            crate::crash_point();
            Ok(pkg)
        })();
        let pkg = match committed {
            Ok(pkg) => pkg,
            Err(e) => {
                for h in &empties {
                    let _ = self.backend.delete(h);
                }
                return Err(e);
            }
        };
        db.charged += needed;
        package_info(&db.conn, pkg)
    }

    // ---- holds, removal, access ----

    fn add_holds(&self, db: &mut Db, pkg: i64, holds: &[Hold]) -> Result<()> {
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

    fn touch_row(&self, pkg: i64) {
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

    // ---- reading ----

    pub(crate) fn packages(&self) -> Result<Vec<PackageInfo>> {
        let db = self.lock_db();
        let pkgs: Vec<i64> = db
            .conn
            .prepare_cached("SELECT pkg FROM packages ORDER BY added_at, pkg")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        pkgs.into_iter()
            .map(|p| package_info(&db.conn, p))
            .collect()
    }

    pub(crate) fn package(&self, id: &PackageId) -> Result<Option<PackageInfo>> {
        let db = self.lock_db();
        find_package(&db.conn, id)?
            .map(|p| package_info(&db.conn, p))
            .transpose()
    }

    pub(crate) fn manifest(&self, id: &PackageId) -> Result<Option<Vec<u8>>> {
        let db = self.lock_db();
        Ok(db
            .conn
            .prepare_cached("SELECT manifest FROM packages WHERE id = ?1")?
            .query_row([id.0.as_bytes()], |r| r.get(0))
            .optional()?)
    }

    pub(crate) fn files(&self, id: &PackageId) -> Result<Vec<FileInfo>> {
        let db = self.lock_db();
        let pkg = find_package(&db.conn, id)?.ok_or(StoreError::UnknownPackage(*id))?;
        let mut stmt = db.conn.prepare_cached(
            "SELECT f.path, b.size, f.executable, b.hash, b.complete, b.verified
             FROM files f JOIN blobs b ON b.blob = f.blob WHERE f.pkg = ?1 ORDER BY f.path",
        )?;
        let mut rows = stmt.query([pkg])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let size = u64_of(r.get(1)?);
            out.push(FileInfo {
                path: path_from(r.get(0)?)?,
                size,
                executable: r.get(2)?,
                hash: hash_from(&r.get::<_, Vec<u8>>(3)?)?,
                completeness: completeness(size, r.get(4)?, r.get(5)?),
            });
        }
        Ok(out)
    }

    pub(crate) fn blob_status(&self, hash: &Hash) -> Result<BlobStatus> {
        // Not under the database lock: pending groups take a partial's lock, which is
        // taken before the database lock, never after.
        let row = blob_row(&self.lock_db().conn, hash)?;
        Ok(match row {
            None => BlobStatus::Missing,
            Some(r) if r.complete => BlobStatus::Complete { size: r.size },
            Some(r) => BlobStatus::Partial {
                size: r.size,
                verified: verified_groups(r.size, r.verified.as_deref())
                    .union(&self.pending_groups(hash)),
            },
        })
    }

    pub(crate) fn open_blob(&self, hash: &Hash) -> Result<BlobReader> {
        let db = self.lock_db();
        let row = blob_row(&db.conn, hash)?.ok_or(StoreError::UnknownBlob(*hash))?;
        if !row.complete {
            return Err(StoreError::Incomplete(*hash));
        }
        let reader = self
            .backend
            .open_data(hash)?
            .ok_or(StoreError::UnknownBlob(*hash))?;
        let pkgs: Vec<i64> = db
            .conn
            .prepare_cached("SELECT DISTINCT pkg FROM files WHERE blob = ?1")?
            .query_map([row.blob], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        drop(db);
        for p in pkgs {
            self.touch_row(p);
        }
        Ok(reader)
    }

    pub(crate) fn open_file(
        &self,
        id: &PackageId,
        path: &PackagePath,
    ) -> Result<(FileInfo, BlobReader)> {
        let db = self.lock_db();
        let pkg = find_package(&db.conn, id)?.ok_or(StoreError::UnknownPackage(*id))?;
        let (hash, size, executable, complete, verified): (
            Vec<u8>,
            i64,
            bool,
            bool,
            Option<Vec<u8>>,
        ) = db
            .conn
            .prepare_cached(
                "SELECT b.hash, b.size, f.executable, b.complete, b.verified
                 FROM files f JOIN blobs b ON b.blob = f.blob WHERE f.pkg = ?1 AND f.path = ?2",
            )?
            .query_row(params![pkg, path.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()?
            .ok_or_else(|| StoreError::UnknownFile {
                package: *id,
                path: path.to_string(),
            })?;
        let hash = hash_from(&hash)?;
        let size = u64_of(size);
        let info = FileInfo {
            path: path.clone(),
            size,
            executable,
            hash,
            completeness: completeness(size, complete, verified),
        };
        if !complete {
            return Err(StoreError::Incomplete(hash));
        }
        let reader = self
            .backend
            .open_data(&hash)?
            .ok_or(StoreError::UnknownBlob(hash))?;
        drop(db);
        self.touch_row(pkg);
        Ok((info, reader))
    }

    // ---- accounting, GC, verify ----

    pub(crate) fn usage(&self) -> Result<Usage> {
        let db = self.lock_db();
        let held: i64 = db.conn.query_row(
            "SELECT coalesce(sum(charge), 0) FROM blobs WHERE blob IN
               (SELECT f.blob FROM files f JOIN holds h ON h.pkg = f.pkg)",
            [],
            |r| r.get(0),
        )?;
        let mut reserved = 0u64;
        {
            let mut stmt = db
                .conn
                .prepare_cached("SELECT size, verified FROM blobs WHERE complete = 0")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let size = u64_of(r.get(0)?);
                let v: Option<Vec<u8>> = r.get(1)?;
                reserved += size - group_set_bytes(size, &verified_groups(size, v.as_deref()));
            }
        }
        let held = u64_of(held);
        let staging = self.staging.load(Ordering::Acquire);
        let database = self.backend.database_bytes(&db.conn);
        Ok(Usage {
            max_bytes: self.max_bytes,
            used: db.charged + staging + database,
            held_bytes: held,
            cached_bytes: db.charged.saturating_sub(held),
            reserved_bytes: reserved,
            staging_bytes: staging,
            database_bytes: database,
            slack: crate::QUOTA_SLACK,
        })
    }

    pub(crate) fn gc(&self) -> Result<GcReport> {
        let mut db = self.lock_db();
        let mut report = GcReport::default();
        // Rows no package uses (none should exist: every removal deletes them).
        let unused: Vec<i64> = db
            .conn
            .prepare(
                "SELECT blob FROM blobs b WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.blob = b.blob)",
            )?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if !unused.is_empty() {
            let tx = db.conn.transaction()?;
            let freed = delete_unused_blobs(&tx, &unused)?;
            tx.commit()?;
            report.blobs_deleted += freed.len() as u64;
            report.bytes_freed += freed.iter().map(|(_, c)| c).sum::<u64>();
            self.forget_blobs(&mut db, &freed);
        }
        // Files no row names.
        let known = all_blob_hashes(&db.conn)?;
        for h in self.backend.list()? {
            if !known.contains(&h) {
                crate::crash_point();
                self.backend.delete(&h)?;
                report.blobs_deleted += 1;
            }
        }
        // The charge total, recomputed from the rows it summarises.
        let charged: i64 =
            db.conn
                .query_row("SELECT coalesce(sum(charge), 0) FROM blobs", [], |r| {
                    r.get(0)
                })?;
        db.charged = u64_of(charged);
        // Over the quota (it was lowered, or the database grew): evict cached packages.
        let used = self.used(&db);
        if used > self.max_bytes {
            let plan = self.plan_eviction(&mut db, used - self.max_bytes, &HashSet::new())?;
            report.packages_evicted = plan.packages.len() as u64;
            let before = db.charged;
            self.evict(&mut db, &plan)?;
            report.bytes_freed += before - db.charged;
        } else {
            self.flush_touched(&mut db)?;
        }
        Ok(report)
    }

    pub(crate) fn verify(&self) -> Result<VerifyReport> {
        // Pending groups are verified but not committed: commit them so they are checked.
        self.flush()?;
        let rows: Vec<(Hash, u64, bool, Option<Vec<u8>>)> = {
            let db = self.lock_db();
            db.conn
                .prepare("SELECT hash, size, complete, verified FROM blobs ORDER BY blob")?
                .query_map([], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .map(|r| {
                    let (h, s, c, v) = r?;
                    Ok((hash_from(&h)?, u64_of(s), c, v))
                })
                .collect::<Result<_>>()?
        };
        let mut report = VerifyReport::default();
        for (hash, size, complete, verified) in rows {
            report.blobs_checked += 1;
            let found = if complete {
                self.check_complete(&hash, size, &mut report.bytes_checked)?
            } else {
                let committed = verified_groups(size, verified.as_deref());
                self.check_partial(&hash, size, &committed, &mut report.bytes_checked)?
            };
            let Some((problem, good)) = found else {
                continue;
            };
            let db = self.lock_db();
            // Removed while being checked: nothing to report.
            let Some(row) = blob_row(&db.conn, &hash)? else {
                continue;
            };
            if problem != Problem::OutboardRepaired {
                db.conn.execute(
                    "UPDATE blobs SET complete = 0, verified = ?2, unsynced = NULL WHERE blob = ?1",
                    params![row.blob, good.to_bytes()],
                )?;
            }
            let packages = db
                .conn
                .prepare_cached(
                    "SELECT DISTINCT p.id FROM files f JOIN packages p ON p.pkg = f.pkg WHERE f.blob = ?1",
                )?
                .query_map([row.blob], |r| r.get::<_, Vec<u8>>(0))?
                .map(|r| id_from(&r?))
                .collect::<Result<_>>()?;
            report.corrupt.push(Corruption {
                hash,
                problem,
                verified_bytes_kept: group_set_bytes(size, &good),
                packages,
            });
        }
        Ok(report)
    }

    /// Re-hashes one complete blob. Wrong data: which groups still verify. A wrong
    /// outboard over right data is rewritten from the data.
    fn check_complete(
        &self,
        hash: &Hash,
        size: u64,
        bytes: &mut u64,
    ) -> Result<Option<(Problem, GroupSet)>> {
        let Some(mut data) = self.backend.open_data(hash)? else {
            return Ok(Some((Problem::Missing, GroupSet::new())));
        };
        if data.len() != size {
            return Ok(Some((
                Problem::WrongLength { found: data.len() },
                GroupSet::new(),
            )));
        }
        let outboard = self
            .backend
            .open_outboard(hash)?
            .unwrap_or_else(BlobReader::empty);
        let mut cmp = CompareWriter {
            expected: Some(&outboard),
            offset: 0,
            equal: true,
            buf: Vec::new(),
        };
        let root = verified::compute_outboard(
            io::BufReader::with_capacity(crate::IO_BUFFER, &mut data),
            size,
            &mut cmp,
        );
        *bytes += size;
        let root = match root {
            Ok(r) => r,
            // Shrunk while being read.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Ok(Some((
                    Problem::WrongLength { found: data.len() },
                    GroupSet::new(),
                )));
            }
            Err(e) => return Err(io_err("reading blob", hash.to_string())(e)),
        };
        if root != *hash {
            let all = GroupSet::all(verified::group_count(size));
            let good = verified::verify_groups(&data, &Outboard::new(*hash, size, &outboard), &all)
                .unwrap_or_default();
            return Ok(Some((Problem::DataMismatch, good)));
        }
        let expected_len = verified::outboard_size(size);
        if cmp.equal && cmp.offset == expected_len && outboard.len() == expected_len {
            return Ok(None);
        }
        let mut again = self
            .backend
            .open_data(hash)?
            .ok_or(StoreError::UnknownBlob(*hash))?;
        self.backend
            .write_outboard(hash, &mut |out: &mut dyn Write| {
                verified::compute_outboard(
                    io::BufReader::with_capacity(crate::IO_BUFFER, &mut again),
                    size,
                    out,
                )
                .map(|_| ())
            })?;
        Ok(Some((
            Problem::OutboardRepaired,
            GroupSet::all(verified::group_count(size)),
        )))
    }

    /// Re-checks the committed groups of a partial blob against the root.
    fn check_partial(
        &self,
        hash: &Hash,
        size: u64,
        committed: &GroupSet,
        bytes: &mut u64,
    ) -> Result<Option<(Problem, GroupSet)>> {
        if committed.is_empty() {
            return Ok(None);
        }
        let Some(data) = self.backend.open_data(hash)? else {
            return Ok(Some((Problem::Missing, GroupSet::new())));
        };
        let outboard = self
            .backend
            .open_outboard(hash)?
            .unwrap_or_else(BlobReader::empty);
        let good =
            verified::verify_groups(&data, &Outboard::new(*hash, size, &outboard), committed)
                .map_err(io_err("reading blob", hash.to_string()))?;
        *bytes += group_set_bytes(size, committed);
        Ok((good != *committed).then_some((Problem::DataMismatch, good)))
    }

    // ---- fetching: partial blobs ----

    fn partials_map(&self) -> MutexGuard<'_, HashMap<Hash, SharedPartial<B>>> {
        self.partials.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Groups of `hash` verified and written but not committed yet.
    fn pending_groups(&self, hash: &Hash) -> GroupSet {
        let p = self.partials_map().get(hash).cloned();
        p.map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).pending.clone())
            .unwrap_or_default()
    }

    /// The open partial blob `hash`, opening its files if needed.
    fn partial(&self, hash: &Hash) -> Result<SharedPartial<B>> {
        let db = self.lock_db();
        if let Some(p) = self.partials_map().get(hash) {
            return Ok(p.clone());
        }
        let row = blob_row(&db.conn, hash)?.ok_or(StoreError::UnknownBlob(*hash))?;
        if row.complete {
            return Err(StoreError::AlreadyComplete(*hash));
        }
        // Under the database lock, so GC's sweep never sees the files without the row.
        let files = self
            .backend
            .open_partial(hash, row.size, verified::outboard_size(row.size))?;
        let p = Arc::new(Mutex::new(Partial::new(
            row.blob,
            row.size,
            files,
            verified_groups(row.size, row.verified.as_deref()),
        )));
        self.partials_map().insert(*hash, p.clone());
        Ok(p)
    }

    /// The open partial blob `hash`, or `None` if it is complete (nothing to write).
    fn writable(&self, hash: &Hash) -> Result<Option<SharedPartial<B>>> {
        match self.partial(hash) {
            Ok(p) => Ok(Some(p)),
            Err(StoreError::AlreadyComplete(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn write_parent(&self, hash: &Hash, parent: &VerifiedParent) -> Result<()> {
        let Some(partial) = self.writable(hash)? else {
            return Ok(());
        };
        let mut p = partial.lock().unwrap_or_else(|e| e.into_inner());
        let outboard = verified::outboard_size(p.size);
        let fits = parent
            .offset
            .checked_add(PAIR_BYTES)
            .is_some_and(|end| end <= outboard);
        if !parent.offset.is_multiple_of(PAIR_BYTES) || !fits {
            return Err(StoreError::ParentOutOfRange {
                hash: *hash,
                offset: parent.offset,
            });
        }
        p.put_pair(parent.offset, &parent.pair)
            .map_err(io_err("writing partial blob", hash.to_string()))
    }

    pub(crate) fn write_group(&self, hash: &Hash, group: u64, data: &[u8]) -> Result<bool> {
        let Some(partial) = self.writable(hash)? else {
            return Ok(true);
        };
        let mut p = partial.lock().unwrap_or_else(|e| e.into_inner());
        let count = verified::group_count(p.size);
        let range = verified::group_bytes(p.size, group);
        if group >= count || data.len() as u64 != range.end - range.start {
            return Err(StoreError::GroupOutOfRange {
                hash: *hash,
                group,
                len: data.len() as u64,
            });
        }
        p.put_data(range.start, data)
            .map_err(io_err("writing partial blob", hash.to_string()))?;
        // A group committed before is taken again: verify may have dropped it.
        p.add_pending(group, data.len() as u64);
        let whole = p.is_whole(count);
        if whole || p.unsynced_bytes + p.pending_bytes >= sync_bytes(p.size) {
            return self.commit_partial(hash, &mut p, true);
        }
        if p.pending_bytes >= soft_commit_bytes(p.size) {
            return self.commit_partial(hash, &mut p, false);
        }
        Ok(false)
    }

    pub(crate) fn have(&self, id: &PackageId) -> Result<Vec<(Hash, GroupSet)>> {
        let rows: Vec<(Hash, u64, bool, Option<Vec<u8>>)> = {
            let db = self.lock_db();
            let pkg = find_package(&db.conn, id)?.ok_or(StoreError::UnknownPackage(*id))?;
            db.conn
                .prepare_cached(
                    "SELECT b.hash, b.size, b.complete, b.verified FROM blobs b
                     WHERE b.blob IN (SELECT blob FROM files WHERE pkg = ?1)",
                )?
                .query_map([pkg], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .map(|r| {
                    let (h, s, c, v) = r?;
                    Ok((hash_from(&h)?, u64_of(s), c, v))
                })
                .collect::<Result<_>>()?
        };
        // Pending groups are read after the database lock is let go (lock order).
        Ok(rows
            .into_iter()
            .map(|(hash, size, complete, verified)| {
                let groups = if complete {
                    GroupSet::all(verified::group_count(size))
                } else {
                    verified_groups(size, verified.as_deref()).union(&self.pending_groups(&hash))
                };
                (hash, groups)
            })
            .collect())
    }

    /// Commits a partial blob's pending groups: `durable`, after fsyncing its files
    /// (and then its unsynced groups are durable too); otherwise unsynced. Marks the
    /// blob complete, always durably, when every group is verified. Returns whether it
    /// is complete.
    fn commit_partial(
        &self,
        hash: &Hash,
        p: &mut Partial<B::Partial>,
        durable: bool,
    ) -> Result<bool> {
        // Gathered bytes and pairs reach the files before anything is committed (pairs
        // may precede the groups they prove by a call or more).
        p.write_buffered()
            .map_err(io_err("writing partial blob", hash.to_string()))?;
        crate::crash_point();
        if p.pending.is_empty() && !(durable && p.unsynced_bytes > 0) {
            return Ok(false);
        }
        let sync = |p: &mut Partial<B::Partial>| {
            p.files
                .sync()
                .map_err(io_err("syncing partial blob", hash.to_string()))
        };
        if durable {
            sync(p)?;
            crate::crash_point();
        }
        let db = self.lock_db();
        let row = match blob_row(&db.conn, hash)? {
            Some(r) if r.blob == p.blob => r,
            // Evicted or removed meanwhile.
            _ => {
                self.partials_map().remove(hash);
                return Err(StoreError::UnknownBlob(*hash));
            }
        };
        if row.complete {
            self.partials_map().remove(hash);
            return Ok(true);
        }
        // The row, not memory, says what was committed: verify may have shrunk it.
        let now = verified_groups(row.size, row.verified.as_deref()).union(&p.pending);
        let complete = now.len() == verified::group_count(row.size);
        if complete {
            if !durable {
                sync(p)?;
            }
            db.conn.execute(
                "UPDATE blobs SET complete = 1, verified = NULL, unsynced = NULL WHERE blob = ?1",
                [row.blob],
            )?;
            self.partials_map().remove(hash);
        } else if durable {
            db.conn.execute(
                "UPDATE blobs SET verified = ?2, unsynced = NULL WHERE blob = ?1",
                params![row.blob, now.to_bytes()],
            )?;
        } else {
            let unsynced = verified_groups(row.size, row.unsynced.as_deref()).union(&p.pending);
            // Not durable on its own (the log is not fsynced): a power loss may take
            // the commit back, which loses nothing but the groups' record.
            db.conn.pragma_update(None, "synchronous", "NORMAL")?;
            let updated = db.conn.execute(
                "UPDATE blobs SET verified = ?2, unsynced = ?3 WHERE blob = ?1",
                params![row.blob, now.to_bytes(), unsynced.to_bytes()],
            );
            db.conn.pragma_update(None, "synchronous", "FULL")?;
            updated?;
        }
        crate::crash_point();
        p.committed = now;
        p.unsynced_bytes = if durable || complete {
            0
        } else {
            p.unsynced_bytes + p.pending_bytes
        };
        p.pending = GroupSet::new();
        p.pending_bytes = 0;
        Ok(complete)
    }

    /// Commits every partial blob's pending and unsynced groups durably.
    pub(crate) fn flush(&self) -> Result<()> {
        let open: Vec<(Hash, SharedPartial<B>)> = self
            .partials_map()
            .iter()
            .map(|(h, p)| (*h, p.clone()))
            .collect();
        for (hash, partial) in open {
            let mut p = partial.lock().unwrap_or_else(|e| e.into_inner());
            match self.commit_partial(&hash, &mut p, true) {
                Ok(_) | Err(StoreError::UnknownBlob(_)) => {}
                Err(e) => return Err(e),
            }
            // Everything is written and committed: let the files and buffers go (a
            // later write opens them again). Not if a writer took it meanwhile.
            let mut map = self.partials_map();
            if map.get(&hash).is_some_and(|q| Arc::ptr_eq(q, &partial))
                && Arc::strong_count(&partial) == 2
            {
                map.remove(&hash);
            }
        }
        Ok(())
    }

    pub(crate) fn source(&self, hash: &Hash) -> Result<BlobSource> {
        let db = self.lock_db();
        let row = blob_row(&db.conn, hash)?.ok_or(StoreError::UnknownBlob(*hash))?;
        let data = self.backend.open_data(hash)?;
        let outboard = self.backend.open_outboard(hash)?;
        drop(db);
        let count = verified::group_count(row.size);
        let verified = if row.complete {
            if data.is_none() {
                return Err(StoreError::UnknownBlob(*hash));
            }
            GroupSet::all(count)
        } else if data.is_none() {
            GroupSet::new()
        } else {
            // Committed groups only: pending ones may still be in a write buffer.
            verified_groups(row.size, row.verified.as_deref())
        };
        Ok(BlobSource {
            hash: *hash,
            size: row.size,
            verified,
            data: data.unwrap_or_else(BlobReader::empty),
            outboard: Outboard::new(*hash, row.size, outboard.unwrap_or_else(BlobReader::empty)),
        })
    }

    pub(crate) fn encode(&self, hash: &Hash, groups: &GroupSet, out: &mut dyn Write) -> Result<()> {
        let src = self.source(hash)?;
        let missing = groups.difference(&src.verified);
        if !missing.is_empty() {
            return Err(StoreError::NotVerified {
                hash: *hash,
                groups: missing,
            });
        }
        verified::encode_groups(&src.data, &src.outboard, groups, out).map_err(|e| match e {
            verified::EncodeError::Corrupt(error) => {
                StoreError::LocalCorrupt { hash: *hash, error }
            }
            verified::EncodeError::Io(e) => StoreError::Write(e),
        })
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

// ---- row helpers ----

fn hash_from(bytes: &[u8]) -> Result<Hash> {
    <[u8; 32]>::try_from(bytes)
        .map(Hash)
        .map_err(|_| StoreError::BadRow("hash"))
}

fn id_from(bytes: &[u8]) -> Result<PackageId> {
    hash_from(bytes).map(PackageId)
}

fn path_from(s: String) -> Result<PackagePath> {
    PackagePath::new(s).map_err(|_| StoreError::BadRow("path"))
}

/// Refuses sizes that cannot belong to a root: only the empty file is 0 bytes.
fn check_possible(path: &PackagePath, root: Hash, size: u64) -> Result<()> {
    if (size == 0) != (root == empty_root()) {
        return Err(StoreError::ImpossibleFile {
            path: path.to_string(),
            hash: root,
            size,
        });
    }
    Ok(())
}

/// The committed verified groups of a partial blob, from its `verified` column. A value
/// that does not parse, or names groups past the end, counts as nothing verified: the
/// store never trusts bytes it cannot account for.
fn verified_groups(size: u64, verified: Option<&[u8]>) -> GroupSet {
    let count = verified::group_count(size);
    let max_ranges = usize::try_from(count.div_ceil(2)).unwrap_or(usize::MAX);
    verified
        .and_then(|v| GroupSet::decode(v, max_ranges).ok())
        .filter(|g| g.end() <= count)
        .unwrap_or_default()
}

/// Bytes of a blob of `size` bytes that `groups` cover.
fn group_set_bytes(size: u64, groups: &GroupSet) -> u64 {
    groups
        .ranges()
        .iter()
        .map(|r| {
            let start = verified::group_bytes(size, r.start).start;
            let end = verified::group_bytes(size, r.end.saturating_sub(1)).end;
            end.saturating_sub(start)
        })
        .sum()
}

fn completeness(size: u64, complete: bool, verified: Option<Vec<u8>>) -> Completeness {
    if complete {
        Completeness::Complete
    } else {
        Completeness::Partial {
            verified_bytes: group_set_bytes(size, &verified_groups(size, verified.as_deref())),
        }
    }
}

fn package_info(conn: &Connection, pkg: i64) -> Result<PackageInfo> {
    let (id, title, kind, total_size, file_count, added_at) = conn
        .prepare_cached(
            "SELECT id, title, kind, total_size, file_count, added_at FROM packages WHERE pkg = ?1",
        )?
        .query_row([pkg], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
    let holds = conn
        .prepare_cached("SELECT reason FROM holds WHERE pkg = ?1 ORDER BY reason")?
        .query_map([pkg], |r| r.get::<_, i64>(0))?
        .filter_map(|r| r.map(Hold::from_code).transpose())
        .collect::<rusqlite::Result<_>>()?;
    let mut complete = true;
    let mut verified_bytes = 0;
    {
        let mut stmt = conn.prepare_cached(
            "SELECT b.size, b.complete, b.verified FROM files f JOIN blobs b ON b.blob = f.blob
             WHERE f.pkg = ?1",
        )?;
        let mut rows = stmt.query([pkg])?;
        while let Some(r) = rows.next()? {
            let size = u64_of(r.get(0)?);
            match completeness(size, r.get(1)?, r.get(2)?) {
                Completeness::Complete => verified_bytes += size,
                Completeness::Partial { verified_bytes: v } => {
                    complete = false;
                    verified_bytes += v;
                }
            }
        }
    }
    let disk_bytes: i64 = conn
        .prepare_cached(
            "SELECT coalesce(sum(charge), 0) FROM blobs WHERE blob IN (SELECT blob FROM files WHERE pkg = ?1)",
        )?
        .query_row([pkg], |r| r.get(0))?;
    Ok(PackageInfo {
        id: id_from(&id)?,
        title,
        kind: kind
            .parse::<Kind>()
            .map_err(|_| StoreError::BadRow("kind"))?,
        total_size: u64_of(total_size),
        file_count: u64_of(file_count),
        completeness: if complete {
            Completeness::Complete
        } else {
            Completeness::Partial { verified_bytes }
        },
        holds,
        added_at: u64_of(added_at),
        disk_bytes: u64_of(disk_bytes),
    })
}

fn find_package(conn: &Connection, id: &PackageId) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT pkg FROM packages WHERE id = ?1")?
        .query_row([id.0.as_bytes()], |r| r.get(0))
        .optional()?)
}

fn blob_row(conn: &Connection, hash: &Hash) -> Result<Option<BlobRow>> {
    Ok(conn
        .prepare_cached(
            "SELECT blob, size, complete, verified, unsynced FROM blobs WHERE hash = ?1",
        )?
        .query_row([hash.as_bytes()], |r| {
            Ok(BlobRow {
                blob: r.get(0)?,
                size: u64_of(r.get(1)?),
                complete: r.get(2)?,
                verified: r.get(3)?,
                unsynced: r.get(4)?,
            })
        })
        .optional()?)
}

fn all_blob_hashes(conn: &Connection) -> Result<HashSet<Hash>> {
    conn.prepare("SELECT hash FROM blobs")?
        .query_map([], |r| r.get::<_, Vec<u8>>(0))?
        .map(|r| hash_from(&r?))
        .collect()
}

fn insert_holds(tx: &Transaction<'_>, pkg: i64, holds: &[Hold]) -> Result<()> {
    let now = i64_of(now_secs());
    let mut stmt = tx.prepare_cached(
        "INSERT INTO holds (pkg, reason, since) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
    )?;
    for h in holds {
        stmt.execute(params![pkg, h.code(), now])?;
    }
    Ok(())
}

/// Inserts a package, its files (whose blob rows must exist), holds and search entry.
fn insert_package_rows(
    tx: &Transaction<'_>,
    signed: &SignedManifest,
    holds: &[Hold],
    accessed: u64,
) -> Result<i64> {
    let m = signed.manifest();
    let md = &m.metadata;
    let optional = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    tx.prepare_cached(
        "INSERT INTO packages (id, manifest, author, created, kind, title, description, tags,
             language, licence, total_size, file_count, added_at, accessed)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?
    .execute(params![
        signed.id().0.as_bytes(),
        signed.bytes(),
        &m.author.0[..],
        i64_of(m.created),
        md.kind.as_str(),
        &md.title,
        &md.description,
        md.tags.join("\n"),
        optional(&md.language),
        optional(&md.licence),
        i64_of(m.total_size()),
        i64_of(m.files.len() as u64),
        i64_of(now_secs()),
        i64_of(accessed),
    ])?;
    let pkg = tx.last_insert_rowid();
    {
        let mut ins = tx.prepare_cached(
            "INSERT INTO files (pkg, path, blob, executable)
             VALUES (?1, ?2, (SELECT blob FROM blobs WHERE hash = ?3), ?4)",
        )?;
        for f in &m.files {
            ins.execute(params![
                pkg,
                f.path.as_str(),
                f.root.as_bytes(),
                f.executable
            ])?;
        }
    }
    insert_holds(tx, pkg, holds)?;
    let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    tx.prepare_cached(
        "INSERT INTO search (rowid, title, description, tags, paths) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        pkg,
        &md.title,
        &md.description,
        md.tags.join("\n"),
        paths.join("\n")
    ])?;
    Ok(pkg)
}

/// Deletes a package's rows; returns the blobs it used.
fn delete_package_rows(tx: &Transaction<'_>, pkg: i64) -> Result<Vec<i64>> {
    let blobs: Vec<i64> = tx
        .prepare_cached("SELECT DISTINCT blob FROM files WHERE pkg = ?1")?
        .query_map([pkg], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    tx.prepare_cached("DELETE FROM search WHERE rowid = ?1")?
        .execute([pkg])?;
    tx.prepare_cached("DELETE FROM packages WHERE pkg = ?1")?
        .execute([pkg])?;
    Ok(blobs)
}

/// Deletes those of `blobs` no package uses any more; returns their hashes and charges.
fn delete_unused_blobs(tx: &Transaction<'_>, blobs: &[i64]) -> Result<Vec<(Hash, u64)>> {
    let mut stmt = tx.prepare_cached(
        "DELETE FROM blobs WHERE blob = ?1 AND NOT EXISTS (SELECT 1 FROM files WHERE blob = ?1)
         RETURNING hash, charge",
    )?;
    let mut out = Vec::new();
    for &b in blobs {
        if let Some((h, c)) = stmt
            .query_row([b], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))
            .optional()?
        {
            out.push((hash_from(&h)?, u64_of(c)));
        }
    }
    Ok(out)
}

/// After an unclean shutdown: deletes blob rows no package uses and files no row names;
/// marks complete blobs whose files are missing or the wrong size as partial (nothing
/// verified), so they are fetched again rather than served.
fn reconcile<B: Backend>(
    backend: &B,
    conn: &mut Connection,
    report: &mut OpenReport,
) -> Result<()> {
    let tx = conn.transaction()?;
    let unused: Vec<i64> = tx
        .prepare("SELECT blob FROM blobs b WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.blob = b.blob)")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    report.blobs_collected = delete_unused_blobs(&tx, &unused)?.len() as u64;
    let rows: Vec<(i64, Vec<u8>, i64)> = tx
        .prepare("SELECT blob, hash, size FROM blobs WHERE complete = 1")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (blob, hash, size) in rows {
        let hash = hash_from(&hash)?;
        let size = u64_of(size);
        let data_ok = backend.open_data(&hash)?.is_some_and(|d| d.len() == size);
        let ob_len = verified::outboard_size(size);
        let outboard_ok = ob_len == 0
            || backend
                .open_outboard(&hash)?
                .is_some_and(|o| o.len() == ob_len);
        if !(data_ok && outboard_ok) {
            tx.execute(
                "UPDATE blobs SET complete = 0, verified = x'', unsynced = NULL WHERE blob = ?1",
                [blob],
            )?;
            report.blobs_damaged += 1;
        }
    }
    // Groups committed before their bytes were fsynced: a power loss may have lost
    // their bytes (or the pairs proving them). Kept only if they verify again.
    /// A partial blob with groups committed unsynced.
    struct Unsynced {
        blob: i64,
        hash: Vec<u8>,
        size: i64,
        verified: Option<Vec<u8>>,
        unsynced: Vec<u8>,
    }
    let rows: Vec<Unsynced> = tx
        .prepare(
            "SELECT blob, hash, size, verified, unsynced FROM blobs
             WHERE complete = 0 AND unsynced IS NOT NULL",
        )?
        .query_map([], |r| {
            Ok(Unsynced {
                blob: r.get(0)?,
                hash: r.get(1)?,
                size: r.get(2)?,
                verified: r.get(3)?,
                unsynced: r.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    for row in rows {
        let hash = hash_from(&row.hash)?;
        let size = u64_of(row.size);
        let claimed = verified_groups(size, Some(&row.unsynced));
        let good = match backend.open_data(&hash)? {
            Some(data) => {
                let outboard = backend
                    .open_outboard(&hash)?
                    .unwrap_or_else(BlobReader::empty);
                verified::verify_groups(&data, &Outboard::new(hash, size, &outboard), &claimed)
                    .unwrap_or_default()
            }
            None => GroupSet::new(),
        };
        let lost = claimed.difference(&good);
        report.unsynced_groups_checked += claimed.len();
        report.unsynced_groups_lost += lost.len();
        let kept = verified_groups(size, row.verified.as_deref()).difference(&lost);
        tx.execute(
            "UPDATE blobs SET verified = ?2, unsynced = NULL WHERE blob = ?1",
            params![row.blob, kept.to_bytes()],
        )?;
    }
    let known = all_blob_hashes(&tx)?;
    tx.commit()?;
    for h in backend.list()? {
        if !known.contains(&h) {
            backend.delete(&h)?;
            report.orphan_files_deleted += 1;
        }
    }
    Ok(())
}
