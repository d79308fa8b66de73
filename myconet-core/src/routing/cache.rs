//! Verified origin announcements and the cache that lets a node check each one once.
//!
//! The same (key, prefix, seqno, signature) arrives from every neighbour and again with
//! every periodic update; Ed25519 verification costs tens of microseconds, a cache hit a
//! hash lookup and a 96-byte comparison. The cache stores the verified announcement
//! itself ([`SignedOrigin`] behind an `Arc`), and route entries point at it, so a node
//! relays exactly the bytes it verified and holds one copy per announcement however many
//! neighbours offer it.

use std::collections::HashMap;
use std::mem::size_of;
use std::sync::{Arc, Mutex};

use ring::signature::{ED25519, UnparsedPublicKey};

use super::util::KeyedState;
use super::wire::signing_message;
use myconet_common::addr::{NODE_PREFIX_LEN, identity_work, node_prefix};

/// An origin's announcement of its prefix at one sequence number, with the signature
/// that proves it. Immutable once verified; shared by every route that carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedOrigin {
    /// The origin's Ed25519 public key (its node identity).
    pub key: [u8; 32],
    /// Upper 64 bits of the announced /64.
    pub prefix: u64,
    /// The origin's sequence number for this announcement.
    pub seqno: u32,
    /// Ed25519 signature over [`signing_message`]`(key, prefix, 64, seqno)`.
    pub signature: [u8; 64],
}

/// Why an announcement was not accepted as authentic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginReject {
    /// The key does not own the prefix (its derived /64 differs).
    UnownedPrefix,
    /// The signature does not verify under the key.
    BadSignature,
    /// The key lacks the identity proof of work (`addr::identity_work`).
    InsufficientWork,
}

/// Upper 64 bits of the /64 a key owns.
pub fn owned_prefix(key: &[u8]) -> u64 {
    (u128::from(node_prefix(key)) >> 64) as u64
}

impl SignedOrigin {
    /// Signs an announcement of `key`'s own /64 at `seqno`.
    pub fn sign(signer: &dyn crate::id::Signer, seqno: u32) -> Option<Self> {
        let key: [u8; 32] = signer.public_key().try_into().ok()?;
        let prefix = owned_prefix(&key);
        let sig = signer.sign(&signing_message(&key, prefix, NODE_PREFIX_LEN, seqno));
        let signature: [u8; 64] = sig.as_slice().try_into().ok()?;
        Some(SignedOrigin {
            key,
            prefix,
            seqno,
            signature,
        })
    }

    /// Checks ownership and the identity proof of work first (two blake3, cheap) and
    /// the signature second (expensive), so a relay announcing someone else's prefix
    /// under its own key, or keys made without the work, costs us little.
    pub fn verify(
        key: &[u8; 32],
        prefix: u64,
        seqno: u32,
        signature: &[u8; 64],
        min_work: u32,
    ) -> Result<Self, OriginReject> {
        if owned_prefix(key) != prefix {
            return Err(OriginReject::UnownedPrefix);
        }
        if min_work > 0 && identity_work(key) < min_work {
            return Err(OriginReject::InsufficientWork);
        }
        let msg = signing_message(key, prefix, NODE_PREFIX_LEN, seqno);
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&msg, signature)
            .map_err(|_| OriginReject::BadSignature)?;
        Ok(SignedOrigin {
            key: *key,
            prefix,
            seqno,
            signature: *signature,
        })
    }
}

/// Bounded cache of verified announcements keyed by (prefix, seqno).
///
/// Two generations: inserts go into `current`; when it holds `capacity` entries it
/// becomes `previous` and the old `previous` is dropped. Hits in `previous` are promoted.
/// That bounds memory at 2 × `capacity` entries with O(1) work per operation and keeps
/// whatever is still in use. Only successes are cached: a forged announcement is
/// re-checked each time it arrives (and counted each time).
#[derive(Debug)]
pub struct VerifyCache {
    current: HashMap<(u64, u32), Arc<SignedOrigin>, KeyedState>,
    previous: HashMap<(u64, u32), Arc<SignedOrigin>, KeyedState>,
    capacity: usize,
    /// Identity proof of work required of a key (see [`SignedOrigin::verify`]).
    min_work: u32,
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Announcements that had to be verified.
    pub verifications: u64,
}

/// A cache shared between routers (the simulator shares one across all nodes so each
/// distinct announcement is verified once in the whole run; a node uses its own).
pub type SharedVerifyCache = Arc<Mutex<VerifyCache>>;

impl VerifyCache {
    /// An empty cache holding up to 2 × `capacity` announcements, accepting keys with
    /// at least `min_work` bits of identity proof of work.
    pub fn new(capacity: usize, min_work: u32, seed: u64) -> Self {
        VerifyCache {
            current: HashMap::with_hasher(KeyedState::new(seed)),
            previous: HashMap::with_hasher(KeyedState::new(seed)),
            capacity: capacity.max(1),
            min_work,
            hits: 0,
            verifications: 0,
        }
    }

    /// A cache wrapped for sharing.
    pub fn shared(capacity: usize, min_work: u32, seed: u64) -> SharedVerifyCache {
        Arc::new(Mutex::new(Self::new(capacity, min_work, seed)))
    }

    /// The verified announcement with exactly these fields, verifying and caching it on
    /// a miss. Exact match on key and signature bytes: a different signature for the same
    /// (prefix, seqno) is verified on its own merits.
    pub fn check(
        &mut self,
        key: &[u8; 32],
        prefix: u64,
        seqno: u32,
        signature: &[u8; 64],
    ) -> Result<Arc<SignedOrigin>, OriginReject> {
        let same = |s: &SignedOrigin| s.key == *key && s.signature == *signature;
        if let Some(s) = self.current.get(&(prefix, seqno))
            && same(s)
        {
            self.hits += 1;
            return Ok(s.clone());
        }
        if let Some(s) = self.previous.remove(&(prefix, seqno)) {
            if same(&s) {
                self.hits += 1;
                self.insert(s.clone());
                return Ok(s);
            }
            self.previous.insert((prefix, seqno), s);
        }
        // The cheap checks before counting: `verifications` counts signature checks.
        if owned_prefix(key) != prefix {
            return Err(OriginReject::UnownedPrefix);
        }
        if self.min_work > 0 && identity_work(key) < self.min_work {
            return Err(OriginReject::InsufficientWork);
        }
        self.verifications += 1;
        let s = Arc::new(SignedOrigin::verify(
            key,
            prefix,
            seqno,
            signature,
            self.min_work,
        )?);
        self.insert(s.clone());
        Ok(s)
    }

    /// Adds an announcement known to be valid (e.g. one this node signed itself).
    pub fn insert(&mut self, s: Arc<SignedOrigin>) {
        if self.current.len() >= self.capacity {
            self.previous = std::mem::replace(
                &mut self.current,
                HashMap::with_hasher(*self.previous.hasher()),
            );
        }
        self.current.insert((s.prefix, s.seqno), s);
    }

    /// Announcements currently held.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held: table capacity × bucket size plus one `SignedOrigin` allocation
    /// (with the Arc counters) per entry. Entries also referenced by routes are counted
    /// here once, which is where they live.
    pub fn memory_bytes(&self) -> usize {
        let bucket = size_of::<((u64, u32), Arc<SignedOrigin>)>() + 1;
        (self.current.capacity() + self.previous.capacity()) * bucket
            + self.len() * (size_of::<SignedOrigin>() + 16)
    }
}
