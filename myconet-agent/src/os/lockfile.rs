//! An exclusive `flock` on a lock file that is removed again when released, for the
//! control socket's path (`<socket>.lock`) and the state directory (`agent.lock`).
//!
//! The file is removed on drop while still locked; a claimant that opened it just
//! before checks after locking that the path still names the inode it locked, and
//! starts over if not. So an agent that exits, however it fails at start-up, leaves no
//! lock file behind, and two agents never both hold one path.

use std::{
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
};

use tracing::warn;

/// How often [`LockFile::acquire`] starts over when the file it locked was removed
/// under it (each time another process released the path in between).
const LOCK_ATTEMPTS: usize = 100;

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("{0} is locked by another process")]
    Held(PathBuf),
    /// Filesystem trouble.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file kept being replaced while we locked it.
    #[error("could not lock {0}: it was replaced {LOCK_ATTEMPTS} times while locking")]
    Unstable(PathBuf),
}

/// A held lock; the file goes when this is dropped.
#[derive(Debug)]
pub struct LockFile {
    file: std::fs::File,
    path: PathBuf,
}

impl LockFile {
    /// Takes the lock on `path` (creating the file, mode 0600) or fails at once if
    /// another process holds it.
    pub fn acquire(path: &Path) -> Result<Self, LockError> {
        let io = |what, source| LockError::Io {
            what,
            path: path.to_path_buf(),
            source,
        };
        for _ in 0..LOCK_ATTEMPTS {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| io("opening", e))?;
            // SAFETY: valid fd owned by `file` for the duration of the call.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Err(LockError::Held(path.to_path_buf()));
                }
                return Err(io("locking", e));
            }
            let held = file.metadata().map_err(|e| io("inspecting", e))?;
            match std::fs::symlink_metadata(path) {
                Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => {
                    return Ok(Self {
                        file,
                        path: path.to_path_buf(),
                    });
                }
                // The previous holder removed the file between our open and our lock.
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("inspecting", e)),
            }
        }
        Err(LockError::Unstable(path.to_path_buf()))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // Still locked here, so nobody else can be relying on this inode yet.
        let held = self.file.metadata().map(|m| (m.dev(), m.ino()));
        let current = std::fs::symlink_metadata(&self.path).map(|m| (m.dev(), m.ino()));
        if let (Ok(held), Ok(current)) = (held, current)
            && held == current
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            warn!(lock = %self.path.display(), error = %e, "could not remove the lock file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_once_and_removed_on_release() {
        let dir = std::env::temp_dir().join(format!("myconet-lockfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.lock");
        let held = LockFile::acquire(&path).unwrap();
        assert!(matches!(LockFile::acquire(&path), Err(LockError::Held(_))));
        drop(held);
        assert!(!path.exists(), "the lock file outlived its lock");
        drop(LockFile::acquire(&path).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
