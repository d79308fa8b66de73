//! The node's long-term Ed25519 identity and the overlay /64 derived from it.
//!
//! Generated on first start and kept as PKCS#8 in the state directory with mode 0600.
//! A file that exists but cannot be read or parsed is an error, never silently replaced:
//! replacing it would change the node's address and strand everyone who knows it.
//!
//! A node key must carry the identity proof of work (`addr::identity_work` of at least
//! `addr::IDENTITY_WORK_BITS`): generating one tries random keys on every core until
//! one has it ([`generate_pkcs8`]), and a key file without it is refused, because other
//! nodes refuse to route to such a key.

use std::{
    fs,
    io::Write,
    net::Ipv6Addr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use myconet_common::addr;

use crate::os::lockfile::{LockError, LockFile};
use ring::{
    rand::{SecureRandom, SystemRandom},
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
    /// The key lacks the identity proof of work (made before identities needed one):
    /// other nodes would refuse to route to it.
    #[error(
        "{path}: key has {work} bits of identity proof of work, {required} are required (other nodes would not route to it); move it away to start with a new identity"
    )]
    InsufficientWork {
        /// The key file.
        path: PathBuf,
        /// Its work bits.
        work: u32,
        /// The bits required.
        required: u32,
    },
}

/// The work a node key must have. The agent's own unit tests (which create many
/// identities in debug builds) use 8 bits; the agent itself, including the one the
/// namespace tests run, the network's [`addr::IDENTITY_WORK_BITS`].
const REQUIRED_WORK: u32 = if cfg!(test) {
    8
} else {
    addr::IDENTITY_WORK_BITS
};

/// The PKCS#8 v2 document ring reads for an Ed25519 key (RFC 8410 with the public key),
/// around the 32-byte seed and the 32-byte public key.
const PKCS8_HEAD: [u8; 16] = [
    0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
const PKCS8_MID: [u8; 3] = [0x81, 0x21, 0x00];

/// A freshly generated key with at least `work_bits` of identity proof of work, as a
/// PKCS#8 document, and how many keys were tried. Tries random keys on every core (each
/// try is one Ed25519 key generation and one blake3), so the expected number of tries
/// is 2^`work_bits` (`docs/protocol.md` has the measured time).
pub fn generate_pkcs8(work_bits: u32) -> Result<(Vec<u8>, u64), IdentityError> {
    let rng = SystemRandom::new();
    let found = AtomicBool::new(false);
    let tries = AtomicU64::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let search = || -> Result<Option<Vec<u8>>, IdentityError> {
        let mut seed = [0u8; 32];
        let mut local = 0u64;
        while !found.load(Ordering::Relaxed) {
            rng.fill(&mut seed).map_err(|_| IdentityError::Random)?;
            local += 1;
            let key =
                Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| IdentityError::Random)?;
            let public = key.public_key().as_ref();
            if addr::identity_work(public) >= work_bits && !found.swap(true, Ordering::Relaxed) {
                tries.fetch_add(local, Ordering::Relaxed);
                let mut doc = Vec::with_capacity(83);
                doc.extend_from_slice(&PKCS8_HEAD);
                doc.extend_from_slice(&seed);
                doc.extend_from_slice(&PKCS8_MID);
                doc.extend_from_slice(public);
                return Ok(Some(doc));
            }
        }
        tries.fetch_add(local, Ordering::Relaxed);
        Ok(None)
    };
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(search)).collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut doc = None;
    for r in results {
        match r {
            Ok(Ok(Some(d))) => doc = Some(d),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(IdentityError::Random),
        }
    }
    let doc = doc.ok_or(IdentityError::Random)?;
    // The document must be exactly what ring reads back, with the key that has the work.
    Ed25519KeyPair::from_pkcs8(&doc).map_err(|_| IdentityError::Random)?;
    Ok((doc, tries.load(Ordering::Relaxed)))
}

/// A node identity: the key pair and what derives from it.
pub struct Identity {
    key: Ed25519KeyPair,
    /// The node's overlay address (computed once: the data path compares with it).
    address: Ipv6Addr,
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
        let work = addr::identity_work(key.public_key().as_ref());
        if work < REQUIRED_WORK {
            return Err(IdentityError::InsufficientWork {
                path: path.to_path_buf(),
                work,
                required: REQUIRED_WORK,
            });
        }
        Ok(Self::from_key(key))
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
                let (pkcs8, _) = generate_pkcs8(REQUIRED_WORK)?;
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
                Ok((Self::from_key(key), true))
            }
            Err(e) => Err(IdentityError::Io { path, source: e }),
        }
    }

    fn from_key(key: Ed25519KeyPair) -> Self {
        let address = addr::node_address(key.public_key().as_ref());
        Self { key, address }
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
        self.address
    }

    /// The key pair, for signing.
    pub fn key_pair(&self) -> &Ed25519KeyPair {
        &self.key
    }
}

/// The cores sign with the node's key through this (handshakes, routing origins,
/// too-big reports, discovery beacons); the key itself stays here.
impl myconet_core::id::Signer for Identity {
    fn public_key(&self) -> &[u8] {
        Identity::public_key(self)
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).as_ref().to_vec()
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
    fn a_generated_identity_carries_the_proof_of_work() {
        let (doc, tries) = generate_pkcs8(8).unwrap();
        let key = Ed25519KeyPair::from_pkcs8(&doc).unwrap();
        assert!(addr::identity_work(key.public_key().as_ref()) >= 8);
        assert!(tries >= 1);
    }

    #[test]
    fn a_key_without_the_proof_of_work_is_refused_not_replaced() {
        let d = tmpdir("nowork");
        fs::create_dir_all(&d).unwrap();
        // A key made without the work (the odds it has 16 bits by chance are 2^-16:
        // take one that does not).
        let doc = (0u8..=255)
            .map(|i| {
                let mut seed = [i; 32];
                seed[0] = 0xee;
                let key = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
                let mut doc = PKCS8_HEAD.to_vec();
                doc.extend_from_slice(&seed);
                doc.extend_from_slice(&PKCS8_MID);
                doc.extend_from_slice(key.public_key().as_ref());
                (doc, addr::identity_work(key.public_key().as_ref()))
            })
            .find(|(_, w)| *w < REQUIRED_WORK)
            .unwrap()
            .0;
        let path = d.join(KEY_FILE);
        fs::write(&path, &doc).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Identity::load_or_create(&d),
            Err(IdentityError::InsufficientWork { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), doc);
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
