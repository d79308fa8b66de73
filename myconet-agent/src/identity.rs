//! The node's long-term Ed25519 identity and the overlay /64 derived from it.
//!
//! Generated on first start and kept as PKCS#8 in the state directory with mode 0600.
//! A file that exists but cannot be read or parsed is an error, never silently replaced:
//! replacing it would change the node's address and strand everyone who knows it.

use std::{
    fs,
    io::Write,
    net::Ipv6Addr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use myconet_common::addr;

use crate::lockfile::{LockError, LockFile};
use ring::{
    rand::SystemRandom,
    signature::{Ed25519KeyPair, KeyPair},
};

/// File name of the key inside the state directory.
pub const KEY_FILE: &str = "identity.pk8";

/// File name of the lock that keeps two agents off one state directory.
pub const LOCK_FILE: &str = "agent.lock";

/// An exclusive lock on a state directory, held for the agent's lifetime: two agents
/// sharing one would share an identity and undo each other's sysctl changes. The lock
/// file is removed when the lock is released.
#[derive(Debug)]
pub struct StateLock {
    _lock: LockFile,
}

impl StateLock {
    /// Takes the lock or fails at once if another process holds it.
    pub fn acquire(state_dir: &Path) -> Result<Self, IdentityError> {
        let path = state_dir.join(LOCK_FILE);
        fs::create_dir_all(state_dir).map_err(|source| IdentityError::Io {
            path: state_dir.to_path_buf(),
            source,
        })?;
        match LockFile::acquire(&path) {
            Ok(lock) => Ok(Self { _lock: lock }),
            Err(LockError::Held(_)) => Err(IdentityError::Locked(state_dir.to_path_buf())),
            Err(LockError::Io { source, .. }) => Err(IdentityError::Io { path, source }),
            Err(e @ LockError::Unstable(_)) => Err(IdentityError::Io {
                path,
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }
}

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Filesystem trouble.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The key file is not a valid Ed25519 PKCS#8 document.
    #[error(
        "{0}: not a valid Ed25519 PKCS#8 key; refusing to replace it (move it away to start with a new identity)"
    )]
    Corrupt(PathBuf),
    /// Others can read the key.
    #[error(
        "{path}: key file is accessible by group or others (mode {mode:o}); fix with chmod 600"
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// Another agent holds the state directory.
    #[error("{0}: another agent is using this state directory")]
    Locked(PathBuf),
    /// The system random generator failed.
    #[error("could not generate a key: system randomness unavailable")]
    Random,
}

/// A node identity: the key pair and what derives from it.
pub struct Identity {
    key: Ed25519KeyPair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("public_key", &self.public_key_hex())
            .finish()
    }
}

impl Identity {
    /// Loads `state_dir/identity.pk8`, creating the directory and a fresh key if absent.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, IdentityError> {
        Self::open(state_dir).map(|(identity, _)| identity)
    }

    /// Checks the key in `state_dir` without changing anything: `Ok(false)` when there
    /// is none yet (one will be created), `Ok(true)` when it is a valid private key, an
    /// error when it is unreadable, exposed or corrupt. Start-up runs this before it
    /// claims anything, so a bad key stops the agent before any socket or lock exists.
    pub fn check(state_dir: &Path) -> Result<bool, IdentityError> {
        let path = state_dir.join(KEY_FILE);
        match fs::read(&path) {
            Ok(bytes) => Self::from_file(&path, &bytes).map(|_| true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(IdentityError::Io { path, source }),
        }
    }

    /// Validates the mode and contents of an existing key file.
    fn from_file(path: &Path, bytes: &[u8]) -> Result<Self, IdentityError> {
        let mode = fs::metadata(path)
            .map_err(|source| IdentityError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(IdentityError::Permissions {
                path: path.to_path_buf(),
                mode: mode & 0o777,
            });
        }
        let key = Ed25519KeyPair::from_pkcs8(bytes)
            .map_err(|_| IdentityError::Corrupt(path.to_path_buf()))?;
        Ok(Self { key })
    }

    /// Like [`Identity::load_or_create`], also saying whether the key was created now.
    pub fn open(state_dir: &Path) -> Result<(Self, bool), IdentityError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io {
                path: path.clone(),
                source,
            }
        };
        fs::create_dir_all(state_dir).map_err(io(state_dir))?;
        let path = state_dir.join(KEY_FILE);
        match fs::read(&path) {
            Ok(bytes) => Self::from_file(&path, &bytes).map(|identity| (identity, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .map_err(|_| IdentityError::Random)?;
                // Write to a temporary file and rename, so a crash never leaves a half key.
                let tmp = state_dir.join(format!("{KEY_FILE}.tmp"));
                let _ = fs::remove_file(&tmp);
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(io(&tmp))?;
                f.write_all(pkcs8.as_ref()).map_err(io(&tmp))?;
                f.sync_all().map_err(io(&tmp))?;
                fs::rename(&tmp, &path).map_err(io(&path))?;
                let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                    .map_err(|_| IdentityError::Corrupt(path.clone()))?;
                Ok((Self { key }, true))
            }
            Err(e) => Err(IdentityError::Io { path, source: e }),
        }
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    /// The public key as lowercase hex.
    pub fn public_key_hex(&self) -> String {
        self.public_key()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The node's /64.
    pub fn node_prefix(&self) -> Ipv6Addr {
        addr::node_prefix(self.public_key())
    }

    /// The node's own overlay address.
    pub fn node_address(&self) -> Ipv6Addr {
        addr::node_address(self.public_key())
    }

    /// The key pair, for signing.
    pub fn key_pair(&self) -> &Ed25519KeyPair {
        &self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("myconet-id-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn created_once_then_reloaded() {
        let d = tmpdir("reload");
        let a = Identity::load_or_create(&d).unwrap();
        let mode = fs::metadata(d.join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Identity::load_or_create(&d).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert!(addr::key_owns(a.public_key(), &a.node_address()));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_state_directory_is_locked_by_one_agent() {
        let d = tmpdir("lock");
        let held = StateLock::acquire(&d).unwrap();
        assert!(matches!(
            StateLock::acquire(&d),
            Err(IdentityError::Locked(_))
        ));
        drop(held);
        assert!(StateLock::acquire(&d).is_ok());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_key_is_an_error_not_replaced() {
        let d = tmpdir("corrupt");
        fs::create_dir_all(&d).unwrap();
        let path = d.join(KEY_FILE);
        fs::write(&path, b"garbage").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Identity::load_or_create(&d),
            Err(IdentityError::Corrupt(_))
        ));
        assert_eq!(fs::read(&path).unwrap(), b"garbage");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Identity::load_or_create(&d),
            Err(IdentityError::Permissions { .. })
        ));
        fs::remove_dir_all(&d).unwrap();
    }
}
