//! Where blob bytes live: the one interface the store's logic ([`crate::core`]) uses for
//! blob data and outboards, implemented by files on disk ([`crate::disk`]) and by
//! memory ([`crate::mem`]). The database and every decision stay in the core.

use std::{
    fs::File,
    io::{self, Read, Seek, SeekFrom, Write},
    os::unix::fs::FileExt,
    sync::{Arc, RwLock},
};

use crate::{Hash, Result};

/// A blob being staged for an add: its data and outboard written, not yet in place.
pub(crate) trait Staging: Send + 'static {
    /// The data and outboard writers, in that order.
    fn writers(&mut self) -> (&mut dyn Write, &mut dyn Write);
    /// Flushes buffered bytes to the files (not to the disk: see [`Backend::sync_staged`]).
    fn finish(&mut self) -> io::Result<()>;
}

/// An open partial blob, written at verified offsets.
pub(crate) trait PartialFiles: Send + 'static {
    /// Writes verified data at `offset`.
    fn write_data(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Writes verified outboard bytes at `offset` of the outboard.
    fn write_outboard(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Makes every write so far durable.
    fn sync(&mut self) -> io::Result<()>;
}

/// Blob bytes storage.
pub(crate) trait Backend: Send + Sync + 'static {
    /// A blob being staged.
    type Staging: Staging;
    /// An open partial blob.
    type Partial: PartialFiles;

    /// Deletes everything staging left behind (only called while no add is running).
    fn clear_staging(&self) -> Result<u64>;
    /// Starts staging a blob of `size` bytes.
    fn stage(&self, size: u64) -> Result<Self::Staging>;
    /// Makes staged bytes durable.
    fn sync_staged(&self, staged: &[&Self::Staging]) -> Result<()>;
    /// Puts a staged blob in place as `hash`, replacing a partial one of that name.
    fn install(&self, staged: Self::Staging, hash: &Hash) -> Result<()>;
    /// Makes the names of installed blobs durable.
    fn sync_installed(&self, hashes: &[Hash]) -> Result<()>;
    /// Opens (creating if needed) a partial blob's files at their full sizes.
    fn open_partial(&self, hash: &Hash, size: u64, outboard_size: u64) -> Result<Self::Partial>;
    /// Deletes a blob's files; a missing file is not an error.
    fn delete(&self, hash: &Hash) -> Result<()>;
    /// Opens a blob's data, `None` if missing.
    fn open_data(&self, hash: &Hash) -> Result<Option<BlobReader>>;
    /// Opens a blob's outboard, `None` if missing.
    fn open_outboard(&self, hash: &Hash) -> Result<Option<BlobReader>>;
    /// Replaces a blob's outboard with what `fill` writes.
    fn write_outboard(
        &self,
        hash: &Hash,
        fill: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
    ) -> Result<()>;
    /// Every blob that has a data or an outboard file.
    fn list(&self) -> Result<Vec<Hash>>;
    /// Bytes the database takes, with its log.
    fn database_bytes(&self, conn: &rusqlite::Connection) -> u64;
    /// What the quota counts for a file of `len` bytes (rounded up to blocks).
    fn charge_for(&self, len: u64) -> u64;
}

/// Read access to one blob's bytes (data or outboard): positioned reads, or `Read` +
/// `Seek` from a cursor. Holds the file open, so a blob deleted meanwhile still reads.
#[derive(Debug)]
pub struct BlobReader {
    source: Source,
    len: u64,
    pos: u64,
}

#[derive(Debug)]
enum Source {
    File(File),
    Mem(Arc<RwLock<Vec<u8>>>),
}

impl BlobReader {
    pub(crate) fn file(file: File, len: u64) -> Self {
        Self {
            source: Source::File(file),
            len,
            pos: 0,
        }
    }

    /// A reader of no bytes.
    pub(crate) fn empty() -> Self {
        Self::mem(Arc::default())
    }

    pub(crate) fn mem(bytes: Arc<RwLock<Vec<u8>>>) -> Self {
        let len = bytes.read().map(|b| b.len() as u64).unwrap_or(0);
        Self {
            source: Source::Mem(bytes),
            len,
            pos: 0,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the file read was removed from the store since it was opened (its last
    /// link is gone): the reader still reads, but its blocks stay allocated, outside
    /// the quota's count, until it is dropped. A server holding a reader across a long
    /// stream checks this to let go of removed blobs. Memory readers are never unlinked.
    pub fn is_unlinked(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match &self.source {
            Source::File(f) => f.metadata().is_ok_and(|m| m.nlink() == 0),
            Source::Mem(_) => false,
        }
    }

    /// Reads at `offset` without moving the cursor; returns 0 at or past the end.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let max = usize::try_from(self.len - offset).unwrap_or(usize::MAX);
        let buf_len = buf.len().min(max);
        let buf = &mut buf[..buf_len];
        match &self.source {
            Source::File(f) => f.read_at(buf, offset),
            Source::Mem(m) => {
                let m = m
                    .read()
                    .map_err(|_| io::Error::other("blob lock poisoned"))?;
                let start = usize::try_from(offset).map_err(io::Error::other)?;
                let n = buf.len().min(m.len().saturating_sub(start));
                buf[..n].copy_from_slice(&m[start..start + n]);
                Ok(n)
            }
        }
    }

    /// Copies the whole blob into `out` (from its start, whatever the cursor). From a
    /// file this is `copy_file_range`: the kernel copies (or, on file systems that can,
    /// shares the extents), so exporting a large file costs no pass through user space.
    pub fn copy_to(&self, out: &mut File) -> io::Result<u64> {
        match &self.source {
            Source::File(f) => {
                let mut f = f.try_clone()?;
                f.seek(SeekFrom::Start(0))?;
                io::copy(&mut (&f).take(self.len), out)
            }
            Source::Mem(m) => {
                let m = m
                    .read()
                    .map_err(|_| io::Error::other("blob lock poisoned"))?;
                out.write_all(&m)?;
                Ok(m.len() as u64)
            }
        }
    }

    /// Fills `buf` from `offset`; errors with `UnexpectedEof` past the end.
    pub fn read_exact_at(&self, mut offset: u64, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(offset, buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.read_at(self.pos, buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for BlobReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

impl myconet_content::verified::ReadAt for BlobReader {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        BlobReader::read_at(self, pos, buf)
    }
}
