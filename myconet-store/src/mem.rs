//! Blob bytes in memory, for tests of whatever drives a store: the same store logic and
//! database (SQLite in memory) as on disk, so it behaves the same, quota included.

use std::{
    collections::HashMap,
    io::{self, Write},
    sync::{Arc, Mutex, RwLock},
};

use crate::{
    Hash, Result,
    backend::{Backend, BlobReader, PartialFiles, Staging},
};

type Bytes = Arc<RwLock<Vec<u8>>>;

#[derive(Default)]
struct MemBlob {
    data: Bytes,
    outboard: Option<Bytes>,
}

/// Blobs in a map.
#[derive(Default)]
pub(crate) struct MemBackend {
    blobs: Mutex<HashMap<Hash, MemBlob>>,
}

impl MemBackend {
    fn blobs(&self) -> std::sync::MutexGuard<'_, HashMap<Hash, MemBlob>> {
        // A panic elsewhere while holding the map leaves it usable: every write to it
        // is a single insert or remove.
        self.blobs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A staged blob in two buffers.
#[derive(Default)]
pub(crate) struct MemStaging {
    data: Vec<u8>,
    outboard: Vec<u8>,
}

impl Staging for MemStaging {
    fn writers(&mut self) -> (&mut dyn Write, &mut dyn Write) {
        (&mut self.data, &mut self.outboard)
    }

    fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A partial blob's buffers.
pub(crate) struct MemPartial {
    data: Bytes,
    outboard: Option<Bytes>,
}

fn write_into(bytes: &Bytes, offset: u64, src: &[u8]) -> io::Result<()> {
    let mut b = bytes
        .write()
        .map_err(|_| io::Error::other("blob lock poisoned"))?;
    let start = usize::try_from(offset).map_err(io::Error::other)?;
    let end = start
        .checked_add(src.len())
        .filter(|&e| e <= b.len())
        .ok_or_else(|| io::Error::other("write past the end of a partial blob"))?;
    b[start..end].copy_from_slice(src);
    Ok(())
}

impl PartialFiles for MemPartial {
    fn write_data(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        write_into(&self.data, offset, bytes)
    }

    fn write_outboard(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        match &self.outboard {
            Some(o) => write_into(o, offset, bytes),
            None => Err(io::Error::other("this blob has no outboard")),
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn zeroed(len: u64) -> Result<Bytes> {
    let len = usize::try_from(len)
        .map_err(|_| crate::StoreError::Read(io::Error::other("blob too large for memory")))?;
    Ok(Arc::new(RwLock::new(vec![0; len])))
}

impl Backend for MemBackend {
    type Staging = MemStaging;
    type Partial = MemPartial;

    fn clear_staging(&self) -> Result<u64> {
        Ok(0)
    }

    fn stage(&self, _size: u64) -> Result<MemStaging> {
        Ok(MemStaging::default())
    }

    fn sync_staged(&self, _: &[&MemStaging]) -> Result<()> {
        Ok(())
    }

    fn install(&self, staged: MemStaging, hash: &Hash) -> Result<()> {
        let blob = MemBlob {
            data: Arc::new(RwLock::new(staged.data)),
            outboard: (!staged.outboard.is_empty()).then(|| Arc::new(RwLock::new(staged.outboard))),
        };
        self.blobs().insert(*hash, blob);
        Ok(())
    }

    fn sync_installed(&self, _: &[Hash]) -> Result<()> {
        Ok(())
    }

    fn open_partial(&self, hash: &Hash, size: u64, outboard_size: u64) -> Result<MemPartial> {
        let mut blobs = self.blobs();
        if let Some(b) = blobs.get_mut(hash) {
            // A blob found the wrong length (by verify) is sized back.
            if let Ok(mut d) = b.data.write() {
                d.resize(usize::try_from(size).unwrap_or(0), 0);
            }
            if b.outboard.is_none() && outboard_size > 0 {
                b.outboard = Some(zeroed(outboard_size)?);
            }
            return Ok(MemPartial {
                data: b.data.clone(),
                outboard: b.outboard.clone(),
            });
        }
        let blob = MemBlob {
            data: zeroed(size)?,
            outboard: if outboard_size > 0 {
                Some(zeroed(outboard_size)?)
            } else {
                None
            },
        };
        let p = MemPartial {
            data: blob.data.clone(),
            outboard: blob.outboard.clone(),
        };
        blobs.insert(*hash, blob);
        Ok(p)
    }

    fn delete(&self, hash: &Hash) -> Result<()> {
        self.blobs().remove(hash);
        Ok(())
    }

    fn open_data(&self, hash: &Hash) -> Result<Option<BlobReader>> {
        Ok(self
            .blobs()
            .get(hash)
            .map(|b| BlobReader::mem(b.data.clone())))
    }

    fn open_outboard(&self, hash: &Hash) -> Result<Option<BlobReader>> {
        Ok(self
            .blobs()
            .get(hash)
            .and_then(|b| b.outboard.clone())
            .map(BlobReader::mem))
    }

    fn write_outboard(
        &self,
        hash: &Hash,
        fill: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
    ) -> Result<()> {
        let mut v = Vec::new();
        fill(&mut v).map_err(crate::StoreError::Staging)?;
        if let Some(b) = self.blobs().get_mut(hash) {
            b.outboard = (!v.is_empty()).then(|| Arc::new(RwLock::new(v)));
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<Hash>> {
        let mut v: Vec<Hash> = self.blobs().keys().copied().collect();
        v.sort_unstable();
        Ok(v)
    }

    fn database_bytes(&self, conn: &rusqlite::Connection) -> u64 {
        conn.query_row(
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n.max(0) as u64)
        .unwrap_or(0)
    }

    fn charge_for(&self, len: u64) -> u64 {
        len
    }
}
