//! BLAKE3 verified streaming: the one wrapper over the `bao-tree` crate (0.17).
//!
//! A blob is named by its BLAKE3 hash, which is also the root of a binary hash tree over
//! its 1 KiB chunks. We keep that tree down to **chunk groups of 16 KiB** (the level
//! below is recomputed from the data when needed) in an *outboard*: the tree's parent
//! hash pairs, 64 bytes each, stored beside the data. Any set of groups can then be sent
//! with the hashes that prove them against the root (a bao *encoding*), and a receiver
//! checks every group before it writes a byte of it.
//!
//! Choices, with reasons:
//! - **16 KiB groups** (`BlockSize::from_chunk_log(4)`): one 64-byte pair per 16 KiB is
//!   0.39 % of the data, both on disk and on the wire (1 KiB groups would be 6.25 %).
//! - **Post-order outboards.** Creating one is a single sequential pass that writes the
//!   outboard as a stream (no seeks, bounded memory: one group buffer and a stack of
//!   hashes). For a partial blob the final size is known from the manifest, so every
//!   node has a fixed offset in a file of [`outboard_size`] bytes and pairs can be
//!   written there in any order as ranges arrive (pre-order would work as well for a known
//!   size; post-order is what also stays correct for a growing file). Unwritten pairs
//!   read back as zeros, which never verify, so a partial outboard can never vouch for
//!   data it does not have.
//! - **Incremental encoder and decoder.** `bao-tree`'s own `encode_ranges_validated` and
//!   `decode_ranges` run a whole response through blocking `Read`/`Write`. A sans-IO
//!   core must instead be fed bytes as they arrive and produce bytes when a socket has
//!   room, so [`Encoder`] and [`Decoder`] walk the same pre-order item sequence as
//!   those functions (`bao_tree::iter::ResponseIter`) and check each item with the same
//!   two BLAKE3 tree primitives (`blake3::hazmat`). The tests check that both produce and
//!   accept exactly what `bao-tree`'s functions do, corrupt input included. Memory per
//!   stream is one chunk group.
//! - Requests are always whole chunk groups ([`GroupSet`]): a partial store can only
//!   prove whole groups, and whole groups keep the item sequence to parents and leaves.
//!
//! Nothing outside this module touches `bao-tree` directly.

use std::{
    io::{self, Read, Write},
    ops::Range,
};

use bao_tree::{
    BaoTree, BlockSize, ChunkNum, ChunkRanges, TreeNode,
    blake3::{
        self,
        hazmat::{ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root},
    },
    iter::{BaoChunk, ResponseIter},
};

use crate::{GroupSet, Hash};

pub use bao_tree::io::sync::{ReadAt, WriteAt};

/// log2 of the chunk-group size in 1 KiB BLAKE3 chunks.
pub const GROUP_CHUNK_LOG: u8 = 4;
/// Bytes in one chunk group: the unit of verification, storage and transfer.
pub const GROUP_BYTES: u64 = 1024 << GROUP_CHUNK_LOG;
/// Bytes of one parent hash pair in an outboard or an encoding.
pub const PAIR_BYTES: u64 = 64;

const BLOCK: BlockSize = BlockSize::from_chunk_log(GROUP_CHUNK_LOG);
const CHUNKS_PER_GROUP: u64 = 1 << GROUP_CHUNK_LOG;

/// Number of chunk groups of a blob of `size` bytes (0 for an empty blob, whose root
/// is the hash of no bytes and needs no transfer).
pub fn group_count(size: u64) -> u64 {
    size.div_ceil(GROUP_BYTES)
}

/// The byte range of `group` in a blob of `size` bytes (the last group may be short).
pub fn group_bytes(size: u64, group: u64) -> Range<u64> {
    let start = group.saturating_mul(GROUP_BYTES).min(size);
    start..start.saturating_add(GROUP_BYTES).min(size)
}

/// Bytes of a blob of `size` bytes held in `groups` (groups past the end count
/// nothing): O(ranges), not O(groups).
pub fn groups_byte_len(size: u64, groups: &GroupSet) -> u64 {
    groups
        .ranges()
        .iter()
        .map(|r| {
            let start = r.start.saturating_mul(GROUP_BYTES).min(size);
            r.end.saturating_mul(GROUP_BYTES).min(size) - start
        })
        .sum()
}

/// The groups that hold the bytes `bytes` of a blob of `size` bytes (clipped to it).
pub fn groups_for_bytes(size: u64, bytes: Range<u64>) -> GroupSet {
    let end = bytes.end.min(size);
    if bytes.start >= end {
        return GroupSet::new();
    }
    GroupSet::from_range(bytes.start / GROUP_BYTES..end.div_ceil(GROUP_BYTES))
}

/// Bytes of the outboard of a blob of `size` bytes: one pair per group boundary.
pub fn outboard_size(size: u64) -> u64 {
    tree(size).outboard_size()
}

/// Exact bytes of the encoding of `groups` of a blob of `size` bytes: the data of those
/// groups plus the parent pairs that prove them. Both ends compute it, so a stream of
/// ranges needs no length field of its own.
pub fn encoded_len(size: u64, groups: &GroupSet) -> Result<u64, RangeError> {
    let ranges = chunk_ranges(size, groups)?;
    Ok(ResponseIter::new(tree(size), ranges)
        .map(|item| match item {
            BaoChunk::Parent { .. } => PAIR_BYTES,
            BaoChunk::Leaf { size, .. } => size as u64,
        })
        .sum())
}

/// A request for groups that do not exist in the blob.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("group {group} is past the end of a blob of {size} bytes ({count} groups)")]
pub struct RangeError {
    /// The first group out of range.
    pub group: u64,
    /// The blob's size in bytes.
    pub size: u64,
    /// The blob's number of groups.
    pub count: u64,
}

/// Why a received encoding was refused. The sender is at fault: the data or a proof
/// does not hash to what the root says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A parent hash pair that does not hash to its parent: nothing under it can verify.
    #[error("proof for groups {}..{} does not match the root", groups.start, groups.end)]
    Proof {
        /// The groups under the bad pair.
        groups: Range<u64>,
    },
    /// Group data that does not hash to what the proof says.
    #[error("data of group {group} does not match the root")]
    Data {
        /// The bad group.
        group: u64,
    },
    /// The decoder already refused this stream; nothing after an error is trusted.
    #[error("the stream already failed verification")]
    AlreadyFailed,
}

/// Why encoding from local data failed.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// Local data or outboard does not match the root: the store holds corrupt bytes
    /// (checked before anything of them is sent).
    #[error("local copy corrupt: {0}")]
    Corrupt(VerifyError),
    /// Reading the data or outboard failed.
    #[error("reading the blob failed: {0}")]
    Io(#[from] io::Error),
}

fn tree(size: u64) -> BaoTree {
    BaoTree::new(size, BLOCK)
}

/// The chunk ranges of `groups`, ready for `bao-tree`: canonical, and open at the end
/// when they include the last group (the form `bao-tree`'s `truncate_ranges` gives).
fn chunk_ranges(size: u64, groups: &GroupSet) -> Result<ChunkRanges, RangeError> {
    let count = group_count(size);
    if groups.end() > count {
        let group = groups
            .iter()
            .find(|g| *g >= count)
            .unwrap_or_else(|| groups.end());
        return Err(RangeError { group, size, count });
    }
    let mut bounds = smallvec::SmallVec::<[ChunkNum; 2]>::new();
    for r in groups.ranges() {
        bounds.push(ChunkNum(r.start * CHUNKS_PER_GROUP));
        if r.end < count {
            bounds.push(ChunkNum(r.end * CHUNKS_PER_GROUP));
        }
    }
    // Sorted and strictly increasing by the GroupSet invariant.
    Ok(ChunkRanges::new(bounds).unwrap_or_else(ChunkRanges::empty))
}

fn groups_of_node(node: TreeNode, size: u64) -> Range<u64> {
    let r = node.chunk_range();
    let count = group_count(size);
    (r.start.0 / CHUNKS_PER_GROUP).min(count)..r.end.0.div_ceil(CHUNKS_PER_GROUP).min(count)
}

fn hash_subtree(start_chunk: u64, data: &[u8], is_root: bool) -> blake3::Hash {
    if is_root {
        blake3::hash(data)
    } else {
        let mut h = blake3::Hasher::new();
        h.set_input_offset(start_chunk * 1024);
        h.update(data);
        blake3::Hash::from(h.finalize_non_root())
    }
}

fn parent_cv(left: &blake3::Hash, right: &blake3::Hash, is_root: bool) -> blake3::Hash {
    let l: &ChainingValue = left.as_bytes();
    let r: &ChainingValue = right.as_bytes();
    if is_root {
        merge_subtrees_root(l, r, Mode::Hash)
    } else {
        blake3::Hash::from(merge_subtrees_non_root(l, r, Mode::Hash))
    }
}

fn split_pair(pair: &[u8; 64]) -> (blake3::Hash, blake3::Hash) {
    let mut l = [0u8; 32];
    let mut r = [0u8; 32];
    l.copy_from_slice(&pair[..32]);
    r.copy_from_slice(&pair[32..]);
    (blake3::Hash::from(l), blake3::Hash::from(r))
}

/// A blob's outboard: its root, its size and the post-order hash pairs in `data`
/// (exactly [`outboard_size`] bytes when complete; pairs past the end of a short or
/// sparse `data` read as zeros and never verify).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outboard<D> {
    root: Hash,
    size: u64,
    data: D,
}

impl<D> Outboard<D> {
    /// An outboard over stored pairs.
    pub fn new(root: Hash, size: u64, data: D) -> Self {
        Self { root, size, data }
    }

    /// The blob's hash.
    pub fn root(&self) -> Hash {
        self.root
    }

    /// The blob's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The stored pairs.
    pub fn data(&self) -> &D {
        &self.data
    }

    /// The stored pairs, mutably.
    pub fn data_mut(&mut self) -> &mut D {
        &mut self.data
    }

    /// Gives the stored pairs back.
    pub fn into_data(self) -> D {
        self.data
    }
}

impl Outboard<Vec<u8>> {
    /// Hashes `data` in memory and builds its outboard (tests and small blobs; large
    /// blobs go through [`compute_outboard`] with a reader).
    pub fn create(data: &[u8]) -> Self {
        let mut out = Vec::with_capacity(outboard_size(data.len() as u64) as usize);
        // Reading from a slice of the stated size and writing to a Vec cannot fail.
        let root =
            compute_outboard(data, data.len() as u64, &mut out).unwrap_or_else(|_| Hash::of(data));
        Self::new(root, data.len() as u64, out)
    }
}

impl<D: WriteAt> Outboard<D> {
    /// Stores a verified parent pair from a [`Decoder`] at its place.
    pub fn save(&mut self, parent: &VerifiedParent) -> io::Result<()> {
        self.data.write_all_at(parent.offset, &parent.pair)
    }
}

impl<D: ReadAt> Outboard<D> {
    fn load(&self, node: TreeNode) -> io::Result<Option<(blake3::Hash, blake3::Hash)>> {
        let Some(offset) = tree(self.size).post_order_offset(node) else {
            return Ok(None);
        };
        let mut pair = [0u8; 64];
        match self
            .data
            .read_exact_at(offset.value() * PAIR_BYTES, &mut pair)
        {
            Ok(()) => Ok(Some(split_pair(&pair))),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Some(split_pair(&[0; 64]))),
            Err(e) => Err(e),
        }
    }
}

/// Lets `bao-tree`'s own functions read our outboards (outboard creation and the tests'
/// cross-checks).
struct BaoView<'a, D>(&'a Outboard<D>);

impl<D: ReadAt> bao_tree::io::sync::Outboard for BaoView<'_, D> {
    fn root(&self) -> blake3::Hash {
        self.0.root.into()
    }
    fn tree(&self) -> BaoTree {
        tree(self.0.size)
    }
    fn load(&self, node: TreeNode) -> io::Result<Option<(blake3::Hash, blake3::Hash)>> {
        self.0.load(node)
    }
}

/// Hashes `size` bytes read from `data` and writes their post-order outboard to
/// `outboard` sequentially; returns the blob's hash. Memory: one group and a stack of
/// hashes, whatever the size. Fails if `data` ends before `size` bytes.
pub fn compute_outboard(data: impl Read, size: u64, outboard: impl Write) -> io::Result<Hash> {
    bao_tree::io::sync::outboard_post_order(data, tree(size), outboard).map(Hash::from)
}

/// Encodes `groups` of a blob from its data and outboard into `out` in one go, checking
/// every group and proof against the root before writing it (so a corrupt local copy
/// is detected, not sent). For a shell that can block on its writer; a non-blocking one
/// uses [`Encoder`].
pub fn encode_groups(
    data: impl ReadAt,
    outboard: &Outboard<impl ReadAt>,
    groups: &GroupSet,
    out: impl Write,
) -> Result<(), EncodeError> {
    let ranges = chunk_ranges(outboard.size, groups)
        .map_err(|e| EncodeError::Io(io::Error::new(io::ErrorKind::InvalidInput, e.to_string())))?;
    bao_tree::io::sync::encode_ranges_validated(data, BaoView(outboard), &ranges, out).map_err(
        |e| match e {
            bao_tree::io::EncodeError::ParentHashMismatch(node) => {
                EncodeError::Corrupt(VerifyError::Proof {
                    groups: groups_of_node(node, outboard.size),
                })
            }
            bao_tree::io::EncodeError::LeafHashMismatch(chunk) => {
                EncodeError::Corrupt(VerifyError::Data {
                    group: chunk.0 / CHUNKS_PER_GROUP,
                })
            }
            bao_tree::io::EncodeError::Io(e) => EncodeError::Io(e),
            other => EncodeError::Io(io::Error::other(other.to_string())),
        },
    )
}

/// Which of `groups` the local data and outboard prove against the root: every byte of
/// those groups is read and hashed, with the proof of each.
pub fn verify_groups(
    data: impl ReadAt,
    outboard: &Outboard<impl ReadAt>,
    groups: &GroupSet,
) -> io::Result<GroupSet> {
    let mut good = GroupSet::new();
    let mut rest = groups.clone();
    let mut buf = Vec::new();
    while !rest.is_empty() {
        let mut enc = Encoder::new(outboard.root, outboard.size, &rest)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let failed = loop {
            buf.clear();
            match enc.fill(&data, outboard, &mut buf, 1 << 20) {
                Ok(true) => break None,
                Ok(false) => {}
                Err(EncodeError::Corrupt(e)) => break Some(e),
                Err(EncodeError::Io(e)) => return Err(e),
            }
        };
        let bad = match failed {
            None => {
                good = good.union(&rest);
                break;
            }
            Some(VerifyError::Proof { groups }) => groups,
            Some(VerifyError::Data { group }) => group..group + 1,
            Some(VerifyError::AlreadyFailed) => break,
        };
        // Items come in ascending order: everything before the bad part verified.
        good = good.union(&rest.intersection(&GroupSet::from_range(0..bad.start)));
        rest.remove_range(0..bad.end.max(bad.start + 1));
    }
    Ok(good)
}

/// An incremental, validating encoder of groups of one blob: the sending half of a
/// range transfer, for shells that write when the socket has room.
#[derive(Debug)]
pub struct Encoder {
    items: ResponseIter,
    stack: Vec<blake3::Hash>,
    size: u64,
    failed: bool,
}

impl Encoder {
    /// An encoder of `groups` of the blob with hash `root` and `size` bytes.
    pub fn new(root: Hash, size: u64, groups: &GroupSet) -> Result<Self, RangeError> {
        let ranges = chunk_ranges(size, groups)?;
        Ok(Self {
            items: ResponseIter::new(tree(size), ranges),
            stack: vec![root.into()],
            size,
            failed: false,
        })
    }

    /// Appends encoded items to `out` until at least `min_bytes` were appended or the
    /// encoding is complete. Returns `true` once it is complete. Every item is checked
    /// against the root before it is appended.
    pub fn fill(
        &mut self,
        data: impl ReadAt,
        outboard: &Outboard<impl ReadAt>,
        out: &mut Vec<u8>,
        min_bytes: usize,
    ) -> Result<bool, EncodeError> {
        if self.failed {
            return Err(EncodeError::Corrupt(VerifyError::AlreadyFailed));
        }
        let start = out.len();
        while out.len() - start < min_bytes {
            let Some(item) = self.items.next() else {
                return Ok(true);
            };
            let r = self.encode_item(item, &data, outboard, out);
            if r.is_err() {
                self.failed = true;
                return r.map(|_| false);
            }
        }
        Ok(false)
    }

    fn encode_item(
        &mut self,
        item: BaoChunk,
        data: &impl ReadAt,
        outboard: &Outboard<impl ReadAt>,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let expected = self
            .stack
            .pop()
            .ok_or(EncodeError::Corrupt(VerifyError::AlreadyFailed))?;
        match item {
            BaoChunk::Parent {
                node,
                is_root,
                left,
                right,
                ..
            } => {
                let bad = || {
                    EncodeError::Corrupt(VerifyError::Proof {
                        groups: groups_of_node(node, self.size),
                    })
                };
                let (l, r) = outboard.load(node)?.ok_or_else(bad)?;
                if parent_cv(&l, &r, is_root) != expected {
                    return Err(bad());
                }
                if right {
                    self.stack.push(r);
                }
                if left {
                    self.stack.push(l);
                }
                out.extend_from_slice(l.as_bytes());
                out.extend_from_slice(r.as_bytes());
            }
            BaoChunk::Leaf {
                start_chunk,
                size,
                is_root,
                ..
            } => {
                let at = out.len();
                out.resize(at + size, 0);
                data.read_exact_at(start_chunk.to_bytes(), &mut out[at..])?;
                if hash_subtree(start_chunk.0, &out[at..], is_root) != expected {
                    out.truncate(at);
                    return Err(EncodeError::Corrupt(VerifyError::Data {
                        group: start_chunk.0 / CHUNKS_PER_GROUP,
                    }));
                }
            }
        }
        Ok(())
    }
}

/// A parent hash pair that verified, with its place in the blob's post-order outboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedParent {
    /// Byte offset of the pair in the outboard.
    pub offset: u64,
    /// The left and right child hashes.
    pub pair: [u8; 64],
}

/// One verified item of a received encoding.
#[derive(Debug, PartialEq, Eq)]
pub enum Verified<'a> {
    /// A proof pair, to store in the blob's outboard (see [`Outboard::save`]).
    Parent(VerifiedParent),
    /// The data of one whole group (the last group of a blob may be short). Its proof
    /// came before it, so once written, the group can be recorded as verified.
    Group {
        /// The group index.
        group: u64,
        /// Byte offset of the data in the blob.
        offset: u64,
        /// The verified bytes.
        data: &'a [u8],
    },
}

/// An incremental decoder of a received encoding of groups of one blob: it takes bytes
/// as they arrive (any split) and gives back each item once it is whole and verified.
/// Holds at most one group of bytes. After the first verification error it refuses
/// everything.
#[derive(Debug)]
pub struct Decoder {
    items: ResponseIter,
    stack: Vec<blake3::Hash>,
    size: u64,
    current: Option<BaoChunk>,
    buf: Vec<u8>,
    remaining: u64,
    failed: bool,
}

impl Decoder {
    /// A decoder for `groups` of the blob with hash `root` and `size` bytes (both from
    /// the signed manifest).
    pub fn new(root: Hash, size: u64, groups: &GroupSet) -> Result<Self, RangeError> {
        let remaining = encoded_len(size, groups)?;
        let ranges = chunk_ranges(size, groups)?;
        Ok(Self {
            items: ResponseIter::new(tree(size), ranges),
            stack: vec![root.into()],
            size,
            current: None,
            buf: Vec::new(),
            remaining,
            failed: false,
        })
    }

    /// Bytes of the encoding still to come.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// True once every item arrived and verified.
    pub fn is_done(&self) -> bool {
        self.remaining == 0 && !self.failed
    }

    /// Takes bytes from the front of `input` until one item is whole, verifies it and
    /// returns it; returns `None` when `input` ran out first (call again with more). Bytes
    /// past the end of the encoding are left in `input`.
    pub fn next<'a>(&'a mut self, input: &mut &[u8]) -> Result<Option<Verified<'a>>, VerifyError> {
        if self.failed {
            return Err(VerifyError::AlreadyFailed);
        }
        let step = loop {
            let item = match self.current {
                Some(item) => item,
                None => match self.items.next() {
                    Some(item) => {
                        self.current = Some(item);
                        self.buf.clear();
                        item
                    }
                    None => return Ok(None),
                },
            };
            let want = match item {
                BaoChunk::Parent { .. } => PAIR_BYTES as usize,
                BaoChunk::Leaf { size, .. } => size,
            };
            let take = (want - self.buf.len()).min(input.len());
            self.buf.extend_from_slice(&input[..take]);
            *input = &input[take..];
            if self.buf.len() < want {
                return Ok(None);
            }
            self.current = None;
            self.remaining -= want as u64;
            match self.verify(item) {
                Ok(Some(step)) => break step,
                Ok(None) => continue,
                Err(e) => {
                    self.failed = true;
                    self.stack.clear();
                    return Err(e);
                }
            }
        };
        Ok(Some(match step {
            Step::Parent(p) => Verified::Parent(p),
            Step::Group { group, offset } => Verified::Group {
                group,
                offset,
                data: &self.buf,
            },
        }))
    }

    /// Checks the item now in `buf`; `None` for a proof node the outboard does not keep
    /// (none when whole groups are requested, which is all this module sends).
    fn verify(&mut self, item: BaoChunk) -> Result<Option<Step>, VerifyError> {
        let expected = self.stack.pop().ok_or(VerifyError::AlreadyFailed)?;
        match item {
            BaoChunk::Parent {
                node,
                is_root,
                left,
                right,
                ..
            } => {
                let mut pair = [0u8; 64];
                pair.copy_from_slice(&self.buf);
                let (l, r) = split_pair(&pair);
                if parent_cv(&l, &r, is_root) != expected {
                    return Err(VerifyError::Proof {
                        groups: groups_of_node(node, self.size),
                    });
                }
                if right {
                    self.stack.push(r);
                }
                if left {
                    self.stack.push(l);
                }
                Ok(tree(self.size).post_order_offset(node).map(|offset| {
                    Step::Parent(VerifiedParent {
                        offset: offset.value() * PAIR_BYTES,
                        pair,
                    })
                }))
            }
            BaoChunk::Leaf {
                start_chunk,
                is_root,
                ..
            } => {
                let group = start_chunk.0 / CHUNKS_PER_GROUP;
                if hash_subtree(start_chunk.0, &self.buf, is_root) != expected {
                    return Err(VerifyError::Data { group });
                }
                Ok(Some(Step::Group {
                    group,
                    offset: start_chunk.to_bytes(),
                }))
            }
        }
    }
}

/// A verified item, before the data is lent out.
enum Step {
    Parent(VerifiedParent),
    Group { group: u64, offset: u64 },
}

#[cfg(test)]
mod tests;
