//! Package manifests: what a package is, signed by its author, in one canonical encoding.
//!
//! A manifest is a protobuf message (schema below and in docs/content.md) with a version,
//! the author's Ed25519 key, a creation time, metadata and the file tree. It travels in
//! a signed envelope; the package id (and so the MRI) is the BLAKE3 hash of the
//! envelope's bytes.
//!
//! ```proto
//! message SignedManifest { bytes manifest = 1; bytes signature = 2; }
//! message Manifest {
//!   uint32 version = 1; bytes author = 2; uint64 created = 3;
//!   Metadata metadata = 4; repeated FileEntry files = 5;
//! }
//! message Metadata {
//!   string title = 1; string description = 2; repeated string tags = 3;
//!   string language = 4; string licence = 5; Kind kind = 6; repeated KeyValue extra = 7;
//! }
//! message KeyValue { string key = 1; string value = 2; }
//! message FileEntry { string path = 1; uint64 size = 2; bool executable = 3; bytes root = 4; }
//! enum Kind { OTHER = 0; FILE = 1; DOCUMENT = 2; IMAGE = 3; AUDIO = 4; VIDEO = 5;
//!             SITE = 6; DATASET = 7; SOFTWARE = 8; }
//! ```
//!
//! **One manifest, one encoding, one MRI.** Files are sorted by path (bytes) and unique,
//! tags sorted and unique, extra keys sorted and unique; fields are written in tag order,
//! defaults omitted (proto3). Parsing decodes, then re-encodes and refuses the bytes
//! unless they come back identical: unknown fields, reordered or repeated fields,
//! non-minimal varints and explicit defaults all fail. The signature covers
//! [`SIGNING_CONTEXT`] followed by the manifest bytes, so it cannot be replayed as a
//! signature over anything else the node's key signs.
//!
//! **Bounded work for hostile bytes.** The size is checked first
//! ([`MAX_MANIFEST_BYTES`]), then a scan of the top-level fields counts the file entries
//! and measures the metadata before anything is allocated for them, so a manifest of
//! millions of empty entries costs a scan, not gigabytes of structs.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    str::FromStr,
};

use prost::Message;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::{
    Hash,
    mri::PackageId,
    path::{PackagePath, PathError},
};

/// The manifest version this code writes and reads.
pub const VERSION: u32 = 1;
/// Prefix of the signed bytes (domain separation).
pub const SIGNING_CONTEXT: &[u8] = b"myconet package manifest v1\0";
/// Largest signed manifest in bytes.
pub const MAX_MANIFEST_BYTES: usize = 16 << 20;
/// Most files in one package.
pub const MAX_FILES: usize = 100_000;
/// Largest encoded metadata block in bytes.
pub const MAX_METADATA_BYTES: usize = 256 << 10;
/// Longest title in bytes.
pub const MAX_TITLE_BYTES: usize = 256;
/// Longest description in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 64 << 10;
/// Most tags.
pub const MAX_TAGS: usize = 64;
/// Longest tag in bytes.
pub const MAX_TAG_BYTES: usize = 64;
/// Longest language tag in bytes (RFC 5646's recommended buffer).
pub const MAX_LANGUAGE_BYTES: usize = 35;
/// Longest licence expression in bytes.
pub const MAX_LICENCE_BYTES: usize = 256;
/// Most free key/values.
pub const MAX_EXTRA: usize = 64;
/// Longest free key in bytes.
pub const MAX_EXTRA_KEY_BYTES: usize = 64;
/// Longest free value in bytes.
pub const MAX_EXTRA_VALUE_BYTES: usize = 4096;
/// Largest single file (1 TiB).
pub const MAX_FILE_BYTES: u64 = 1 << 40;

mod pb {
    //! The wire structs, exactly the schema in the module docs.

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Signed {
        #[prost(bytes = "vec", tag = "1")]
        pub manifest: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub signature: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Manifest {
        #[prost(uint32, tag = "1")]
        pub version: u32,
        #[prost(bytes = "vec", tag = "2")]
        pub author: Vec<u8>,
        #[prost(uint64, tag = "3")]
        pub created: u64,
        #[prost(message, optional, tag = "4")]
        pub metadata: Option<Metadata>,
        #[prost(message, repeated, tag = "5")]
        pub files: Vec<FileEntry>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Metadata {
        #[prost(string, tag = "1")]
        pub title: String,
        #[prost(string, tag = "2")]
        pub description: String,
        #[prost(string, repeated, tag = "3")]
        pub tags: Vec<String>,
        #[prost(string, tag = "4")]
        pub language: String,
        #[prost(string, tag = "5")]
        pub licence: String,
        #[prost(int32, tag = "6")]
        pub kind: i32,
        #[prost(message, repeated, tag = "7")]
        pub extra: Vec<KeyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FileEntry {
        #[prost(string, tag = "1")]
        pub path: String,
        #[prost(uint64, tag = "2")]
        pub size: u64,
        #[prost(bool, tag = "3")]
        pub executable: bool,
        #[prost(bytes = "vec", tag = "4")]
        pub root: Vec<u8>,
    }
}

/// What a package holds, for people and for search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Kind {
    /// Anything else (the default).
    #[default]
    Other = 0,
    /// A plain file or set of files.
    File = 1,
    /// A text document.
    Document = 2,
    /// An image.
    Image = 3,
    /// Audio.
    Audio = 4,
    /// Video.
    Video = 5,
    /// A website (has an `index.html`).
    Site = 6,
    /// A data set.
    Dataset = 7,
    /// Software.
    Software = 8,
}

impl Kind {
    /// Every kind, in wire order.
    pub const ALL: [Kind; 9] = [
        Kind::Other,
        Kind::File,
        Kind::Document,
        Kind::Image,
        Kind::Audio,
        Kind::Video,
        Kind::Site,
        Kind::Dataset,
        Kind::Software,
    ];

    /// The kind with wire value `v`.
    pub fn from_i32(v: i32) -> Option<Self> {
        usize::try_from(v)
            .ok()
            .and_then(|i| Self::ALL.get(i))
            .copied()
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Other => "other",
            Kind::File => "file",
            Kind::Document => "document",
            Kind::Image => "image",
            Kind::Audio => "audio",
            Kind::Video => "video",
            Kind::Site => "site",
            Kind::Dataset => "dataset",
            Kind::Software => "software",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = ManifestError;
    fn from_str(s: &str) -> Result<Self, ManifestError> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| ManifestError::KindName(s.to_owned()))
    }
}

/// An author's Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthorKey(pub [u8; 32]);

impl fmt::Display for AuthorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&Hash(self.0), f)
    }
}

impl fmt::Debug for AuthorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthorKey({self})")
    }
}

impl AuthorKey {
    /// The public key of `key`.
    pub fn of(key: &Ed25519KeyPair) -> Self {
        let mut k = [0u8; 32];
        k.copy_from_slice(key.public_key().as_ref());
        Self(k)
    }

    /// True for a point of small order (its order divides 8). Nobody holds a private key
    /// for such a point, yet signatures "verify" under it for most messages (S = 0 with
    /// R the small-order point `-[k]A`, which a forger computes by trying the eight),
    /// and ring's verification accepts them. A manifest under such a key could
    /// be signed by anybody, and re-signed into as many package ids as a forger likes,
    /// so these keys are refused.
    pub fn is_small_order(&self) -> bool {
        let mut y = self.0;
        y[31] &= 0x7f; // the sign of x: both signs of a small-order y are small-order
        SMALL_ORDER_Y.contains(&y)
    }
}

/// The y coordinates (little-endian, 255 bits) of the Ed25519 points of small order:
/// 0 (order 4, x = ±sqrt(-1)), 1 (the identity), the two of order 8 (y² = (-1 +
/// sqrt(1 + d)) / d, the root for which that is a square), p - 1 (order 2), and p and
/// p + 1, the non-canonical spellings of 0 and 1 (y ≥ p is only possible for y < 19).
/// Computed for this module from the curve equation -x² + y² = 1 + d·x²·y².
const SMALL_ORDER_Y: [[u8; 32]; 7] = [
    hex32("0000000000000000000000000000000000000000000000000000000000000000"),
    hex32("0100000000000000000000000000000000000000000000000000000000000000"),
    hex32("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    hex32("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    hex32("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    hex32("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    hex32("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
];

const fn hex32(s: &str) -> [u8; 32] {
    const fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not lowercase hex"),
        }
    }
    let b = s.as_bytes();
    assert!(b.len() == 64);
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = (nibble(b[2 * i]) << 4) | nibble(b[2 * i + 1]);
        i += 1;
    }
    out
}

/// The descriptive part of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata {
    /// Title (may be empty).
    pub title: String,
    /// Description (may be empty; newlines and tabs allowed).
    pub description: String,
    /// Tags (sorted and unique once in a manifest).
    pub tags: Vec<String>,
    /// Language as a BCP 47 tag, e.g. `en`, `pt-BR`, `zh-Hant-TW` (empty if not given).
    pub language: String,
    /// Licence as an SPDX expression, e.g. `MIT OR Apache-2.0` (empty if not given).
    pub licence: String,
    /// What the package holds.
    pub kind: Kind,
    /// Free key/values (sorted by key by the map).
    pub extra: BTreeMap<String, String>,
}

/// One file of a package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Where it goes in the package.
    pub path: PackagePath,
    /// Its size in bytes.
    pub size: u64,
    /// Whether it is extracted executable.
    pub executable: bool,
    /// Its BLAKE3 hash: the root of its verified-streaming tree and the blob's name.
    pub root: Hash,
}

/// A validated manifest (version [`VERSION`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The author's key; the envelope must carry its signature.
    pub author: AuthorKey,
    /// Creation time, seconds since the Unix epoch (as the author says).
    pub created: u64,
    /// Descriptive metadata.
    pub metadata: Metadata,
    /// Files, sorted by path, unique.
    pub files: Vec<FileEntry>,
}

/// Why a manifest is refused. Every variant names what is wrong, and limits name their
/// constant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Bigger than [`MAX_MANIFEST_BYTES`].
    #[error("manifest is {0} bytes, at most {MAX_MANIFEST_BYTES} (MAX_MANIFEST_BYTES) allowed")]
    TooLarge(usize),
    /// Not valid protobuf for the schema.
    #[error("not a valid manifest encoding: {0}")]
    Decode(String),
    /// Valid protobuf, but not the canonical encoding of what it says.
    #[error(
        "{0} is not in canonical encoding (unknown, repeated or reordered fields, explicit defaults or long varints)"
    )]
    NotCanonical(&'static str),
    /// A version this code does not read.
    #[error("manifest version {0} is not supported (this node reads version {VERSION})")]
    Version(u32),
    /// The author key is not 32 bytes.
    #[error("author key is {0} bytes, an Ed25519 key is 32")]
    AuthorKey(usize),
    /// The author key is a point of small order, under which anybody can sign.
    #[error("author key {0} is an Ed25519 point of small order: anybody can sign under it")]
    WeakAuthorKey(AuthorKey),
    /// The signature does not verify under the author key.
    #[error("signature does not verify under the author's key")]
    BadSignature,
    /// The signing key is not the manifest's author.
    #[error("signing key {signer} is not the manifest's author {author}")]
    WrongSigner {
        /// The key that tried to sign.
        signer: AuthorKey,
        /// The author in the manifest.
        author: AuthorKey,
    },
    /// No files.
    #[error("a package holds at least one file")]
    NoFiles,
    /// More than [`MAX_FILES`] files.
    #[error("{0} files, at most {MAX_FILES} (MAX_FILES) allowed")]
    TooManyFiles(usize),
    /// An invalid path.
    #[error("file {index}: {error}")]
    Path {
        /// Index of the file entry.
        index: usize,
        /// What is wrong with its path.
        error: PathError,
    },
    /// Two files with one path.
    #[error("duplicate path {0}")]
    Duplicate(String),
    /// Files not sorted by path.
    #[error("files are not sorted by path: {later} comes after {earlier}")]
    Unsorted {
        /// The path that should come first.
        later: String,
        /// The path before it.
        earlier: String,
    },
    /// A file whose path is also a directory of another file.
    #[error("{0} is both a file and a directory of another file")]
    FileIsDirectory(String),
    /// A root that is not 32 bytes.
    #[error("file {path}: hash is {len} bytes, need 32")]
    RootLength {
        /// The file.
        path: String,
        /// The length given.
        len: usize,
    },
    /// An empty file whose hash is not the hash of no bytes.
    #[error("file {0}: size 0 but its hash is not the hash of no bytes")]
    EmptyFileHash(String),
    /// Two files with one hash and different sizes: one size disagrees with the data.
    #[error(
        "files {other_path} ({other_size} bytes) and {path} ({size} bytes) have one hash: a size disagrees with the data"
    )]
    RootSizeConflict {
        /// The later file.
        path: String,
        /// Its size.
        size: u64,
        /// The earlier file with the same hash.
        other_path: String,
        /// Its size.
        other_size: u64,
    },
    /// A file whose hash is the hash of no bytes but whose size is not 0.
    #[error("file {path}: {size} bytes, but its hash is the hash of no bytes")]
    EmptyHashSize {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
    },
    /// A file over [`MAX_FILE_BYTES`].
    #[error("file {path}: {size} bytes, at most {MAX_FILE_BYTES} (MAX_FILE_BYTES) allowed")]
    FileTooLarge {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
    },
    /// The metadata block is over [`MAX_METADATA_BYTES`].
    #[error("metadata is {0} bytes, at most {MAX_METADATA_BYTES} (MAX_METADATA_BYTES) allowed")]
    MetadataTooLarge(usize),
    /// A text field over its limit.
    #[error("{field} is {len} bytes, at most {max} ({constant}) allowed")]
    FieldTooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
        /// The constant's name.
        constant: &'static str,
    },
    /// A control character in a text field.
    #[error("{0} contains a control character")]
    Control(&'static str),
    /// More than [`MAX_TAGS`] tags.
    #[error("{0} tags, at most {MAX_TAGS} (MAX_TAGS) allowed")]
    TooManyTags(usize),
    /// An empty tag.
    #[error("empty tag")]
    EmptyTag,
    /// Tags not sorted and unique.
    #[error("tags are not sorted and unique at {0:?}")]
    TagsNotSorted(String),
    /// Not a BCP 47 language tag.
    #[error("language {tag:?} is not a BCP 47 tag: {why}")]
    Language {
        /// The tag.
        tag: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Not an SPDX licence expression.
    #[error("licence {expr:?} is not an SPDX expression: {why}")]
    Licence {
        /// The expression.
        expr: String,
        /// What is wrong.
        why: String,
    },
    /// A kind value this version does not define.
    #[error("unknown kind {0}")]
    Kind(i32),
    /// A kind name this version does not define.
    #[error(
        "unknown kind {0:?} (one of other, file, document, image, audio, video, site, dataset, software)"
    )]
    KindName(String),
    /// More than [`MAX_EXTRA`] key/values.
    #[error("{0} extra key/values, at most {MAX_EXTRA} (MAX_EXTRA) allowed")]
    TooManyExtra(usize),
    /// Extra keys not sorted and unique, or an empty key.
    #[error("extra keys are not sorted, unique and non-empty at {0:?}")]
    ExtraNotSorted(String),
    /// Sizes that add up past what a u64 holds.
    #[error("total size overflows")]
    TotalOverflow,
}

fn too_long(field: &'static str, len: usize, max: usize, constant: &'static str) -> ManifestError {
    ManifestError::FieldTooLong {
        field,
        len,
        max,
        constant,
    }
}

fn check_text(
    field: &'static str,
    s: &str,
    max: usize,
    constant: &'static str,
    allow_newlines: bool,
) -> Result<(), ManifestError> {
    if s.len() > max {
        return Err(too_long(field, s.len(), max, constant));
    }
    if s.chars()
        .any(|c| c.is_control() && !(allow_newlines && (c == '\n' || c == '\t')))
    {
        return Err(ManifestError::Control(field));
    }
    Ok(())
}

impl Metadata {
    fn validate(&self) -> Result<(), ManifestError> {
        check_text(
            "title",
            &self.title,
            MAX_TITLE_BYTES,
            "MAX_TITLE_BYTES",
            false,
        )?;
        check_text(
            "description",
            &self.description,
            MAX_DESCRIPTION_BYTES,
            "MAX_DESCRIPTION_BYTES",
            true,
        )?;
        if self.tags.len() > MAX_TAGS {
            return Err(ManifestError::TooManyTags(self.tags.len()));
        }
        for (i, t) in self.tags.iter().enumerate() {
            if t.is_empty() {
                return Err(ManifestError::EmptyTag);
            }
            check_text("tag", t, MAX_TAG_BYTES, "MAX_TAG_BYTES", false)?;
            if i > 0 && self.tags[i - 1] >= *t {
                return Err(ManifestError::TagsNotSorted(t.clone()));
            }
        }
        if !self.language.is_empty() {
            check_text(
                "language",
                &self.language,
                MAX_LANGUAGE_BYTES,
                "MAX_LANGUAGE_BYTES",
                false,
            )?;
            check_language(&self.language).map_err(|why| ManifestError::Language {
                tag: self.language.clone(),
                why,
            })?;
        }
        if !self.licence.is_empty() {
            check_text(
                "licence",
                &self.licence,
                MAX_LICENCE_BYTES,
                "MAX_LICENCE_BYTES",
                false,
            )?;
            check_spdx(&self.licence).map_err(|why| ManifestError::Licence {
                expr: self.licence.clone(),
                why,
            })?;
        }
        if self.extra.len() > MAX_EXTRA {
            return Err(ManifestError::TooManyExtra(self.extra.len()));
        }
        for (k, v) in &self.extra {
            if k.is_empty() {
                return Err(ManifestError::ExtraNotSorted(k.clone()));
            }
            check_text(
                "extra key",
                k,
                MAX_EXTRA_KEY_BYTES,
                "MAX_EXTRA_KEY_BYTES",
                false,
            )?;
            check_text(
                "extra value",
                v,
                MAX_EXTRA_VALUE_BYTES,
                "MAX_EXTRA_VALUE_BYTES",
                true,
            )?;
        }
        Ok(())
    }

    fn to_pb(&self) -> pb::Metadata {
        pb::Metadata {
            title: self.title.clone(),
            description: self.description.clone(),
            tags: self.tags.clone(),
            language: self.language.clone(),
            licence: self.licence.clone(),
            kind: self.kind as i32,
            extra: self
                .extra
                .iter()
                .map(|(k, v)| pb::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
        }
    }

    fn from_pb(m: pb::Metadata) -> Result<Self, ManifestError> {
        let kind = Kind::from_i32(m.kind).ok_or(ManifestError::Kind(m.kind))?;
        if m.extra.len() > MAX_EXTRA {
            return Err(ManifestError::TooManyExtra(m.extra.len()));
        }
        let mut extra = BTreeMap::new();
        let mut prev: Option<String> = None;
        for kv in m.extra {
            if prev.as_ref().is_some_and(|p| *p >= kv.key) {
                return Err(ManifestError::ExtraNotSorted(kv.key));
            }
            prev = Some(kv.key.clone());
            extra.insert(kv.key, kv.value);
        }
        Ok(Self {
            title: m.title,
            description: m.description,
            tags: m.tags,
            language: m.language,
            licence: m.licence,
            kind,
            extra,
        })
    }
}

impl Manifest {
    /// A manifest from its parts: files and tags are sorted (tags deduplicated), then
    /// everything is checked as a parsed manifest would be.
    pub fn new(
        author: AuthorKey,
        created: u64,
        mut metadata: Metadata,
        mut files: Vec<FileEntry>,
    ) -> Result<Self, ManifestError> {
        metadata.tags.sort();
        metadata.tags.dedup();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let m = Self {
            author,
            created,
            metadata,
            files,
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks every rule of the format.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.author.is_small_order() {
            return Err(ManifestError::WeakAuthorKey(self.author));
        }
        self.metadata.validate()?;
        if self.files.is_empty() {
            return Err(ManifestError::NoFiles);
        }
        if self.files.len() > MAX_FILES {
            return Err(ManifestError::TooManyFiles(self.files.len()));
        }
        let mut dirs = HashSet::new();
        // The first file of each hash: every other file with that hash must agree on the
        // size (the hash commits to the length, so at most one size can be the data's).
        let mut first_of: HashMap<Hash, usize> = HashMap::with_capacity(self.files.len());
        let empty = Hash::of(b"");
        let mut total = 0u64;
        for (i, f) in self.files.iter().enumerate() {
            if i > 0 {
                let prev = &self.files[i - 1].path;
                if *prev == f.path {
                    return Err(ManifestError::Duplicate(f.path.to_string()));
                }
                if *prev > f.path {
                    return Err(ManifestError::Unsorted {
                        later: f.path.to_string(),
                        earlier: prev.to_string(),
                    });
                }
            }
            if f.size > MAX_FILE_BYTES {
                return Err(ManifestError::FileTooLarge {
                    path: f.path.to_string(),
                    size: f.size,
                });
            }
            if f.size == 0 && f.root != empty {
                return Err(ManifestError::EmptyFileHash(f.path.to_string()));
            }
            if f.size != 0 && f.root == empty {
                return Err(ManifestError::EmptyHashSize {
                    path: f.path.to_string(),
                    size: f.size,
                });
            }
            let first = &self.files[*first_of.entry(f.root).or_insert(i)];
            if first.size != f.size {
                return Err(ManifestError::RootSizeConflict {
                    path: f.path.to_string(),
                    size: f.size,
                    other_path: first.path.to_string(),
                    other_size: first.size,
                });
            }
            total = total
                .checked_add(f.size)
                .ok_or(ManifestError::TotalOverflow)?;
            for d in f.path.ancestors() {
                dirs.insert(d);
            }
        }
        if let Some(f) = self.files.iter().find(|f| dirs.contains(f.path.as_str())) {
            return Err(ManifestError::FileIsDirectory(f.path.to_string()));
        }
        Ok(())
    }

    /// The canonical encoding (unsigned).
    pub fn encode(&self) -> Vec<u8> {
        self.to_pb().encode_to_vec()
    }

    fn to_pb(&self) -> pb::Manifest {
        pb::Manifest {
            version: VERSION,
            author: self.author.0.to_vec(),
            created: self.created,
            metadata: Some(self.metadata.to_pb()),
            files: self
                .files
                .iter()
                .map(|f| pb::FileEntry {
                    path: f.path.to_string(),
                    size: f.size,
                    executable: f.executable,
                    root: f.root.0.to_vec(),
                })
                .collect(),
        }
    }

    /// Parses canonical manifest bytes (unsigned) and checks every rule.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        prescan(bytes)?;
        let p = pb::Manifest::decode(bytes).map_err(|e| ManifestError::Decode(e.to_string()))?;
        if p.encode_to_vec() != bytes {
            return Err(ManifestError::NotCanonical("manifest"));
        }
        if p.version != VERSION {
            return Err(ManifestError::Version(p.version));
        }
        // The encoder always writes the metadata block, even when empty: one encoding.
        let Some(metadata) = p.metadata else {
            return Err(ManifestError::NotCanonical(
                "manifest without a metadata block",
            ));
        };
        let author = AuthorKey(
            p.author
                .as_slice()
                .try_into()
                .map_err(|_| ManifestError::AuthorKey(p.author.len()))?,
        );
        let metadata = Metadata::from_pb(metadata)?;
        let mut files = Vec::with_capacity(p.files.len());
        for (index, f) in p.files.into_iter().enumerate() {
            let root =
                Hash(
                    f.root
                        .as_slice()
                        .try_into()
                        .map_err(|_| ManifestError::RootLength {
                            path: f.path.clone(),
                            len: f.root.len(),
                        })?,
                );
            let path =
                PackagePath::new(f.path).map_err(|error| ManifestError::Path { index, error })?;
            files.push(FileEntry {
                path,
                size: f.size,
                executable: f.executable,
                root,
            });
        }
        let m = Self {
            author,
            created: p.created,
            metadata,
            files,
        };
        m.validate()?;
        Ok(m)
    }

    /// Signs the manifest with the author's key.
    pub fn sign(&self, key: &Ed25519KeyPair) -> Result<SignedManifest, ManifestError> {
        let signer = AuthorKey::of(key);
        if signer != self.author {
            return Err(ManifestError::WrongSigner {
                signer,
                author: self.author,
            });
        }
        self.validate()?;
        let manifest = self.encode();
        let signature = key.sign(&signed_message(&manifest)).as_ref().to_vec();
        let bytes = pb::Signed {
            manifest,
            signature,
        }
        .encode_to_vec();
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        Ok(SignedManifest {
            id: PackageId::of_signed_manifest(&bytes),
            bytes,
            manifest: self.clone(),
        })
    }

    /// Sum of the file sizes.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// The file at `path`.
    pub fn file(&self, path: &PackagePath) -> Option<&FileEntry> {
        self.files
            .binary_search_by(|f| f.path.cmp(path))
            .ok()
            .map(|i| &self.files[i])
    }

    /// Every distinct blob (hash and size) the package needs, in file order of first
    /// use: identical files are one blob.
    pub fn blobs(&self) -> Vec<(Hash, u64)> {
        let mut seen = HashSet::new();
        self.files
            .iter()
            .filter(|f| seen.insert(f.root))
            .map(|f| (f.root, f.size))
            .collect()
    }
}

fn signed_message(manifest: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + manifest.len());
    m.extend_from_slice(SIGNING_CONTEXT);
    m.extend_from_slice(manifest);
    m
}

/// Walks the top-level fields of manifest bytes without allocating: refuses more than
/// [`MAX_FILES`] file entries and metadata over [`MAX_METADATA_BYTES`] before prost
/// allocates a struct per entry.
fn prescan(mut b: &[u8]) -> Result<(), ManifestError> {
    let bad = |what: &str| ManifestError::Decode(what.to_owned());
    let mut files = 0usize;
    while !b.is_empty() {
        let key = varint(&mut b).ok_or_else(|| bad("truncated field key"))?;
        match key & 7 {
            0 => {
                varint(&mut b).ok_or_else(|| bad("truncated varint"))?;
            }
            1 => b = b.get(8..).ok_or_else(|| bad("truncated fixed64"))?,
            5 => b = b.get(4..).ok_or_else(|| bad("truncated fixed32"))?,
            2 => {
                let len = varint(&mut b).ok_or_else(|| bad("truncated length"))?;
                let len = usize::try_from(len).map_err(|_| bad("length overflows"))?;
                if len > b.len() {
                    return Err(bad("field longer than the manifest"));
                }
                match key >> 3 {
                    4 if len > MAX_METADATA_BYTES => {
                        return Err(ManifestError::MetadataTooLarge(len));
                    }
                    5 => {
                        files += 1;
                        if files > MAX_FILES {
                            return Err(ManifestError::TooManyFiles(files));
                        }
                    }
                    _ => {}
                }
                b = &b[len..];
            }
            _ => return Err(bad("unsupported wire type")),
        }
    }
    Ok(())
}

fn varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&c, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(c & 0x7f) << (7 * i);
        if c & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// A manifest with its author's signature, as stored and sent: the bytes, the id they
/// hash to, and the parsed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedManifest {
    bytes: Vec<u8>,
    id: PackageId,
    manifest: Manifest,
}

impl SignedManifest {
    /// Parses and checks signed manifest bytes: size, canonical envelope, canonical
    /// manifest, every rule, and the signature.
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let env = pb::Signed::decode(bytes).map_err(|e| ManifestError::Decode(e.to_string()))?;
        if env.encode_to_vec() != bytes {
            return Err(ManifestError::NotCanonical("signed envelope"));
        }
        let manifest = Manifest::decode(&env.manifest)?;
        UnparsedPublicKey::new(&ED25519, manifest.author.0)
            .verify(&signed_message(&env.manifest), &env.signature)
            .map_err(|_| ManifestError::BadSignature)?;
        Ok(Self {
            id: PackageId::of_signed_manifest(bytes),
            bytes: bytes.to_vec(),
            manifest,
        })
    }

    /// The signed bytes (what is stored, sent, and hashed into the id).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The package id.
    pub fn id(&self) -> PackageId {
        self.id
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
}

/// Syntactic check of a BCP 47 (RFC 5646) language tag: `language[-script][-region]
/// *(-variant) *(-extension) [-privateuse]`, or private use alone (`x-…`). Irregular
/// grandfathered tags (`i-klingon`, …) are refused. Case is free, as in RFC 5646.
pub fn check_language(tag: &str) -> Result<(), &'static str> {
    let subtags: Vec<&str> = tag.split('-').collect();
    if subtags
        .iter()
        .any(|s| s.is_empty() || s.len() > 8 || !s.bytes().all(|c| c.is_ascii_alphanumeric()))
    {
        return Err("subtags are 1 to 8 ASCII letters or digits separated by '-'");
    }
    let alpha = |s: &str| s.bytes().all(|c| c.is_ascii_alphabetic());
    let digit = |s: &str| s.bytes().all(|c| c.is_ascii_digit());
    let mut i = 0;
    let first = subtags[0];
    if first.eq_ignore_ascii_case("x") {
        return private_use(&subtags[1..]);
    }
    if !alpha(first) || !(2..=8).contains(&first.len()) {
        return Err("the primary language subtag is 2 to 8 letters");
    }
    i += 1;
    // Up to three extended language subtags after a 2-3 letter language.
    if first.len() <= 3 {
        let mut ext = 0;
        while i < subtags.len() && subtags[i].len() == 3 && alpha(subtags[i]) && ext < 3 {
            i += 1;
            ext += 1;
        }
    }
    if i < subtags.len() && subtags[i].len() == 4 && alpha(subtags[i]) {
        i += 1; // script
    }
    if i < subtags.len()
        && ((subtags[i].len() == 2 && alpha(subtags[i]))
            || (subtags[i].len() == 3 && digit(subtags[i])))
    {
        i += 1; // region
    }
    let mut variants = HashSet::new();
    while i < subtags.len() {
        let s = subtags[i];
        let is_variant =
            (5..=8).contains(&s.len()) || (s.len() == 4 && s.as_bytes()[0].is_ascii_digit());
        if !is_variant {
            break;
        }
        if !variants.insert(s.to_ascii_lowercase()) {
            return Err("a variant subtag is repeated");
        }
        i += 1;
    }
    let mut singletons = HashSet::new();
    while i < subtags.len() {
        let s = subtags[i];
        if s.len() != 1 {
            return Err("unexpected subtag (not a script, region, variant or extension)");
        }
        if s.eq_ignore_ascii_case("x") {
            return private_use(&subtags[i + 1..]);
        }
        if !singletons.insert(s.to_ascii_lowercase()) {
            return Err("an extension singleton is repeated");
        }
        i += 1;
        let start = i;
        while i < subtags.len() && subtags[i].len() >= 2 {
            i += 1;
        }
        if i == start {
            return Err("an extension singleton needs at least one 2-8 character subtag");
        }
    }
    Ok(())
}

fn private_use(rest: &[&str]) -> Result<(), &'static str> {
    if rest.is_empty() {
        Err("private use 'x' needs at least one subtag")
    } else {
        Ok(())
    }
}

/// Syntactic check of an SPDX licence expression (SPDX 2.3 annex D): license ids
/// (`[A-Za-z0-9.-]+`, optionally `+`), `LicenseRef-…`, `DocumentRef-…:LicenseRef-…`,
/// combined with `AND`, `OR`, `WITH` (uppercase) and parentheses. Ids are not checked
/// against the SPDX list, so new licences need no software update.
pub fn check_spdx(expr: &str) -> Result<(), String> {
    let tokens = spdx_tokens(expr)?;
    let mut p = SpdxParser { t: &tokens, i: 0 };
    p.or_expr(0)?;
    if p.i != tokens.len() {
        return Err(format!("unexpected {:?}", tokens[p.i]));
    }
    Ok(())
}

fn spdx_tokens(expr: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b' ' => i += 1,
            b'(' | b')' => {
                out.push(&expr[i..i + 1]);
                i += 1;
            }
            c if c.is_ascii_alphanumeric() || c == b'.' || c == b'-' || c == b':' || c == b'+' => {
                let start = i;
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'.' | b'-' | b':' | b'+'))
                {
                    i += 1;
                }
                out.push(&expr[start..i]);
            }
            _ => {
                return Err(format!(
                    "character {:?} at byte {i} is not allowed",
                    expr[i..].chars().next().unwrap_or('?')
                ));
            }
        }
    }
    if out.is_empty() {
        return Err("empty expression".into());
    }
    Ok(out)
}

struct SpdxParser<'a> {
    t: &'a [&'a str],
    i: usize,
}

impl SpdxParser<'_> {
    const MAX_DEPTH: usize = 16;

    fn peek(&self) -> Option<&str> {
        self.t.get(self.i).copied()
    }

    fn or_expr(&mut self, depth: usize) -> Result<(), String> {
        self.and_expr(depth)?;
        while self.peek() == Some("OR") {
            self.i += 1;
            self.and_expr(depth)?;
        }
        Ok(())
    }

    fn and_expr(&mut self, depth: usize) -> Result<(), String> {
        self.with_expr(depth)?;
        while self.peek() == Some("AND") {
            self.i += 1;
            self.with_expr(depth)?;
        }
        Ok(())
    }

    fn with_expr(&mut self, depth: usize) -> Result<(), String> {
        match self.peek() {
            Some("(") => {
                if depth >= Self::MAX_DEPTH {
                    return Err("parentheses nested too deeply".into());
                }
                self.i += 1;
                self.or_expr(depth + 1)?;
                if self.peek() != Some(")") {
                    return Err("missing ')'".into());
                }
                self.i += 1;
                Ok(())
            }
            Some(tok) => {
                license_ref(tok)?;
                self.i += 1;
                if self.peek() == Some("WITH") {
                    self.i += 1;
                    let exc = self.peek().ok_or("WITH needs an exception id")?;
                    if !idstring(exc) {
                        return Err(format!("{exc:?} is not an exception id"));
                    }
                    self.i += 1;
                }
                Ok(())
            }
            None => Err("expression ends where a licence was expected".into()),
        }
    }
}

fn idstring(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-')
}

fn license_ref(tok: &str) -> Result<(), String> {
    if ["AND", "OR", "WITH", ")"].contains(&tok) {
        return Err(format!("{tok:?} where a licence was expected"));
    }
    if matches!(tok, "and" | "or" | "with") {
        return Err(format!("operators are uppercase: {:?}", tok.to_uppercase()));
    }
    if let Some((doc, lic)) = tok.split_once(':') {
        let ok = doc.strip_prefix("DocumentRef-").is_some_and(idstring)
            && lic.strip_prefix("LicenseRef-").is_some_and(idstring);
        return if ok {
            Ok(())
        } else {
            Err(format!("{tok:?} is not DocumentRef-<id>:LicenseRef-<id>"))
        };
    }
    let id = tok.strip_suffix('+').unwrap_or(tok);
    if idstring(id) {
        Ok(())
    } else {
        Err(format!("{tok:?} is not a licence id"))
    }
}

#[cfg(test)]
mod tests;
