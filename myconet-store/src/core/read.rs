//! Reading: packages, files and blobs.

use super::*;

impl<B: Backend> Core<B> {
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
}
