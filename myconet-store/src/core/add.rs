//! Adding: staging blobs, inserting a package whole, and storing a manifest to fetch.

use super::*;

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

impl<B: Backend> Core<B> {
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
        let mut files = self.backend.stage(size)?;
        let mut source = io::BufReader::with_capacity(
            crate::io_buffer_for(size),
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
                _ => {}
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
    pub(super) fn undo_installs(&self, installed: &[(Hash, bool)]) {
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
            let mut s = self.backend.stage(0)?;
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
}
