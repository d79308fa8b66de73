//! Quota: what counts against `max_bytes`, least-recently-used eviction, and GC.

use super::*;

/// What eviction would remove.
#[derive(Default)]
pub(super) struct EvictionPlan {
    packages: Vec<i64>,
    freed: u64,
    /// Blobs not to free.
    keep: HashSet<i64>,
}

impl<B: Backend> Core<B> {
    /// Makes room for `needed` more bytes, evicting least recently used cached
    /// packages if that is enough; refuses, evicting nothing, if it is not. The blobs
    /// in `keep` (those the package being stored uses) are never freed.
    pub(super) fn make_room(&self, db: &mut Db, needed: u64, keep: &HashSet<Hash>) -> Result<()> {
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
    pub(super) fn plan_eviction(
        &self,
        db: &mut Db,
        want: u64,
        keep: &HashSet<Hash>,
    ) -> Result<EvictionPlan> {
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
    pub(super) fn evict(&self, db: &mut Db, plan: &EvictionPlan) -> Result<()> {
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
    pub(super) fn forget_blobs(&self, db: &mut Db, freed: &[(Hash, u64)]) {
        let mut partials = self.partials_map();
        for (hash, charge) in freed {
            partials.remove(hash);
            db.charged = db.charged.saturating_sub(*charge);
            crate::crash_point();
            // A file that cannot be deleted now is an orphan: GC sweeps it later.
            let _ = self.backend.delete(hash);
        }
    }

    pub(super) fn flush_touched(&self, db: &mut Db) -> Result<()> {
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
}
