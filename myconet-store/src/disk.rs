//! Blob bytes as files: `<dir>/blobs/<2 hex>/<64 hex>.data` and `.obao` (the outboard,
//! only for blobs bigger than one chunk group), staged under `<dir>/staging/` and moved
//! into place by rename. Shard directories are made when first used. See docs/content.md, "The store", for the write order.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufWriter, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::{
    Hash, Result, StoreError,
    backend::{Backend, BlobReader, PartialFiles, Staging},
    error::io_err,
};

/// File name of the database inside the store directory.
pub(crate) const DATABASE: &str = "store.sqlite";
const LOCK: &str = "LOCK";
const BLOBS: &str = "blobs";
const STAGING: &str = "staging";
const DATA: &str = "data";
const OUTBOARD: &str = "obao";
/// Up to this many files (or directories) are fsynced one by one; more, and the whole
/// file system is synced at once.
const SYNC_ONE_BY_ONE: usize = 16;

/// Blob files under one store directory, which this process holds locked.
pub(crate) struct DiskBackend {
    dir: PathBuf,
    blobs: PathBuf,
    staging: PathBuf,
    block: u64,
    next_staging: AtomicU64,
    /// Shard directories known to exist (made on first use: a small store does not pay
    /// for 256 directories).
    shards: Mutex<[bool; 256]>,
    /// The log's size, counted in full from the start (see `schema::wal_limit`).
    wal_limit: u64,
    /// Held open for its `flock`: one process per store.
    _lock: File,
}

impl DiskBackend {
    /// Opens (creating) the directory layout and takes the store's lock.
    pub(crate) fn open(dir: &Path, max_bytes: u64) -> Result<Self> {
        fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("opening", &lock_path))?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            return Err(if err.kind() == io::ErrorKind::WouldBlock {
                StoreError::Locked {
                    dir: dir.to_path_buf(),
                }
            } else {
                io_err("locking", &lock_path)(err)
            });
        }
        let blobs = dir.join(BLOBS);
        let staging = dir.join(STAGING);
        let created = !blobs.is_dir() || !staging.is_dir();
        fs::create_dir_all(&blobs).map_err(io_err("creating", &blobs))?;
        fs::create_dir_all(&staging).map_err(io_err("creating", &staging))?;
        if created {
            sync_dir(dir)?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            block: block_size(dir),
            blobs,
            staging,
            next_staging: AtomicU64::new(0),
            shards: Mutex::new([false; 256]),
            wal_limit: crate::schema::wal_limit(max_bytes),
            _lock: lock,
        })
    }

    /// Makes everything written to the store's file system durable at once: for many
    /// files, one `syncfs` costs one journal commit where an fsync each costs one each
    /// (10,000 small files: about a minute here, against seconds). It also waits for
    /// other writers' dirty data on the same file system.
    fn sync_file_system(&self) -> Result<()> {
        let d = File::open(&self.staging).map_err(io_err("opening", &self.staging))?;
        // SAFETY: syncfs on a descriptor we own; no memory is passed.
        if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
            return Err(io_err("syncing the file system of", &self.dir)(
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    fn shard(&self, hash: &Hash) -> PathBuf {
        self.blobs.join(format!("{:02x}", hash.0[0]))
    }

    /// Makes the shard directory of `hash` if needed, durably, before a file is put in.
    fn ensure_shard(&self, hash: &Hash) -> Result<()> {
        let mut known = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        let i = usize::from(hash.0[0]);
        if known[i] {
            return Ok(());
        }
        let d = self.shard(hash);
        match fs::create_dir(&d) {
            Ok(()) => sync_dir(&self.blobs)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("creating", &d)(e)),
        }
        known[i] = true;
        Ok(())
    }

    fn path(&self, hash: &Hash, ext: &str) -> PathBuf {
        self.shard(hash).join(format!("{hash}.{ext}"))
    }
}

/// The file system's allocation unit for `dir`, at least 4 KiB.
fn block_size(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return 4096;
    };
    // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 4096;
    }
    (st.f_frsize as u64).max(4096)
}

/// fsyncs a directory so the names created, renamed or removed in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

/// A staged blob: `staging/<n>.data`, and `staging/<n>.obao` once an outboard byte is
/// written. Deleted on drop unless installed.
pub(crate) struct DiskStaging {
    data_path: PathBuf,
    data: BufWriter<File>,
    obao_path: PathBuf,
    obao: Option<BufWriter<File>>,
    obao_writer: LazyFile,
    installed: bool,
}

/// Creates its file at the first write, so blobs with an empty outboard have no file.
struct LazyFile {
    path: PathBuf,
    file: Option<BufWriter<File>>,
    buffer: usize,
}

impl Write for LazyFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.file.is_none() {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&self.path)?;
            self.file = Some(BufWriter::with_capacity(self.buffer, f));
        }
        self.file.as_mut().map_or(Ok(0), |f| f.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().map_or(Ok(()), |f| f.flush())
    }
}

impl Staging for DiskStaging {
    fn writers(&mut self) -> (&mut dyn Write, &mut dyn Write) {
        (&mut self.data, &mut self.obao_writer)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.data.flush()?;
        self.obao_writer.flush()?;
        self.obao = self.obao_writer.file.take();
        Ok(())
    }
}

impl Drop for DiskStaging {
    fn drop(&mut self) {
        if !self.installed {
            let _ = fs::remove_file(&self.data_path);
            let _ = fs::remove_file(&self.obao_path);
        }
    }
}

/// A partial blob's open files.
pub(crate) struct DiskPartial {
    data: File,
    obao: Option<File>,
    /// Set while the files' directory entries may not be durable yet.
    dir_unsynced: Option<PathBuf>,
}

impl PartialFiles for DiskPartial {
    fn write_data(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.data.write_all_at(bytes, offset)
    }

    fn write_outboard(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        match &self.obao {
            Some(f) => f.write_all_at(bytes, offset),
            None => Err(io::Error::other("this blob has no outboard")),
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        self.data.sync_data()?;
        if let Some(o) = &self.obao {
            o.sync_data()?;
        }
        if let Some(dir) = self.dir_unsynced.take() {
            File::open(&dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Backend for DiskBackend {
    type Staging = DiskStaging;
    type Partial = DiskPartial;

    fn clear_staging(&self) -> Result<u64> {
        let mut n = 0;
        for entry in fs::read_dir(&self.staging).map_err(io_err("listing", &self.staging))? {
            let entry = entry.map_err(io_err("listing", &self.staging))?;
            let path = entry.path();
            fs::remove_file(&path).map_err(io_err("deleting", &path))?;
            n += 1;
        }
        Ok(n)
    }

    fn stage(&self, size: u64) -> Result<DiskStaging> {
        let n = self.next_staging.fetch_add(1, Ordering::Relaxed);
        let data_path = self.staging.join(format!("{n}.{DATA}"));
        let obao_path = self.staging.join(format!("{n}.{OUTBOARD}"));
        let data = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&data_path)
            .map_err(io_err("creating", &data_path))?;
        Ok(DiskStaging {
            data_path,
            data: BufWriter::with_capacity(crate::io_buffer_for(size), data),
            obao_writer: LazyFile {
                path: obao_path.clone(),
                file: None,
                buffer: crate::io_buffer_for(myconet_content::verified::outboard_size(size)),
            },
            obao_path,
            obao: None,
            installed: false,
        })
    }

    fn sync_staged(&self, staged: &[&DiskStaging]) -> Result<()> {
        if staged.len() > SYNC_ONE_BY_ONE {
            return self.sync_file_system();
        }
        for s in staged {
            s.data
                .get_ref()
                .sync_data()
                .map_err(io_err("syncing", &s.data_path))?;
            if let Some(o) = &s.obao {
                o.get_ref()
                    .sync_data()
                    .map_err(io_err("syncing", &s.obao_path))?;
            }
        }
        Ok(())
    }

    fn install(&self, mut staged: DiskStaging, hash: &Hash) -> Result<()> {
        self.ensure_shard(hash)?;
        let data = self.path(hash, DATA);
        let obao = self.path(hash, OUTBOARD);
        if staged.obao.is_some() {
            fs::rename(&staged.obao_path, &obao).map_err(io_err("moving into place", &obao))?;
        } else {
            remove_if_exists(&obao)?;
        }
        crate::crash_point();
        fs::rename(&staged.data_path, &data).map_err(io_err("moving into place", &data))?;
        staged.installed = true;
        Ok(())
    }

    fn sync_installed(&self, hashes: &[Hash]) -> Result<()> {
        let mut shards: Vec<u8> = hashes.iter().map(|h| h.0[0]).collect();
        shards.sort_unstable();
        shards.dedup();
        if shards.len() > SYNC_ONE_BY_ONE {
            return self.sync_file_system();
        }
        for s in shards {
            sync_dir(&self.blobs.join(format!("{s:02x}")))?;
        }
        Ok(())
    }

    fn open_partial(&self, hash: &Hash, size: u64, outboard_size: u64) -> Result<DiskPartial> {
        self.ensure_shard(hash)?;
        let mut created = false;
        let mut open = |path: PathBuf, len: u64| -> Result<File> {
            created |= !path.exists();
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io_err("opening", &path))?;
            let cur = f
                .metadata()
                .map_err(io_err("reading size of", &path))?
                .len();
            if cur != len {
                f.set_len(len).map_err(io_err("sizing", &path))?;
            }
            Ok(f)
        };
        let data = open(self.path(hash, DATA), size)?;
        let obao = if outboard_size > 0 {
            Some(open(self.path(hash, OUTBOARD), outboard_size)?)
        } else {
            None
        };
        Ok(DiskPartial {
            data,
            obao,
            dir_unsynced: created.then(|| self.shard(hash)),
        })
    }

    fn delete(&self, hash: &Hash) -> Result<()> {
        remove_if_exists(&self.path(hash, DATA))?;
        remove_if_exists(&self.path(hash, OUTBOARD))
    }

    fn open_data(&self, hash: &Hash) -> Result<Option<BlobReader>> {
        open_reader(&self.path(hash, DATA))
    }

    fn open_outboard(&self, hash: &Hash) -> Result<Option<BlobReader>> {
        open_reader(&self.path(hash, OUTBOARD))
    }

    fn write_outboard(
        &self,
        hash: &Hash,
        fill: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
    ) -> Result<()> {
        let n = self.next_staging.fetch_add(1, Ordering::Relaxed);
        let tmp = self.staging.join(format!("{n}.{OUTBOARD}"));
        let f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
        let mut w = BufWriter::with_capacity(crate::IO_BUFFER, f);
        let written = fill(&mut w)
            .and_then(|()| w.flush())
            .and_then(|()| w.get_ref().sync_data());
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("writing", &tmp)(e));
        }
        let dest = self.path(hash, OUTBOARD);
        fs::rename(&tmp, &dest).map_err(io_err("moving into place", &dest))?;
        sync_dir(&self.shard(hash))
    }

    fn list(&self) -> Result<Vec<Hash>> {
        let mut out = Vec::new();
        for shard in 0..=255u8 {
            let d = self.blobs.join(format!("{shard:02x}"));
            let entries = match fs::read_dir(&d) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("listing", &d)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err("listing", &d))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let Some((stem, ext)) = name.split_once('.') else {
                    continue;
                };
                if ext != DATA && ext != OUTBOARD {
                    continue;
                }
                if let Ok(h) = stem.parse::<Hash>()
                    && h.0[0] == shard
                {
                    out.push(h);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    fn database_bytes(&self, _conn: &rusqlite::Connection) -> u64 {
        let len = |suffix: &str| {
            fs::metadata(self.dir.join(format!("{DATABASE}{suffix}"))).map_or(0, |m| m.len())
        };
        // The log grows to its cut-back size and stays there: count it at that size
        // from the start, so use does not creep up as it fills.
        len("") + len("-wal").max(self.wal_limit) + len("-shm")
    }

    fn charge_for(&self, len: u64) -> u64 {
        len.div_ceil(self.block) * self.block
    }
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("deleting", path)(e)),
    }
}

fn open_reader(path: &Path) -> Result<Option<BlobReader>> {
    match File::open(path) {
        Ok(f) => {
            let len = f.metadata().map_err(io_err("reading size of", path))?.len();
            Ok(Some(BlobReader::file(f, len)))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("opening", path)(e)),
    }
}
