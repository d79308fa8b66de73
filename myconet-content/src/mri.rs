//! MRIs: the names of packages and of files inside them.
//!
//! `mri:` + the lowercase RFC 4648 base32 (no padding, 52 characters) of the package id,
//! the BLAKE3 hash of the signed manifest bytes; optionally `/` + a file's path inside the
//! package. The same MRI always means the same bytes: the id fixes the signed manifest,
//! which fixes every file's size and hash.
//!
//! The path part is percent-encoded like a URI path: ASCII letters and digits and
//! `-._~!$&'()*+,;=:@` stand for themselves, `/` separates components, every other byte
//! of the UTF-8 path is `%` and two uppercase hex digits. Parsing is strict so that every
//! MRI has exactly one spelling and `parse(s).to_string() == s`: uppercase schemes,
//! padding, lowercase or needless escapes and non-zero trailing bits are errors that say
//! what is wrong.

use std::{fmt, str::FromStr};

use crate::{
    Hash,
    path::{PackagePath, PathError},
};

/// The scheme prefix.
pub const SCHEME: &str = "mri:";
/// Characters of a package id in base32.
pub const ID_CHARS: usize = 52;

const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// A package's id: the BLAKE3 hash of its signed manifest bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackageId(pub Hash);

impl PackageId {
    /// The id of the signed manifest `bytes`.
    pub fn of_signed_manifest(bytes: &[u8]) -> Self {
        Self(Hash::of(bytes))
    }

    /// The hash.
    pub fn hash(&self) -> Hash {
        self.0
    }
}

impl fmt::Display for PackageId {
    /// The base32 form used in MRIs (without the scheme).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; ID_CHARS];
        let bytes = self.0.as_bytes();
        let (mut acc, mut bits, mut n) = (0u32, 0u32, 0usize);
        for &b in bytes {
            acc = (acc << 8) | u32::from(b);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                out[n] = ALPHABET[((acc >> bits) & 31) as usize];
                n += 1;
            }
        }
        if bits > 0 {
            out[n] = ALPHABET[((acc << (5 - bits)) & 31) as usize];
        }
        // ALPHABET is ASCII.
        f.write_str(std::str::from_utf8(&out).unwrap_or_default())
    }
}

impl fmt::Debug for PackageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackageId({self})")
    }
}

impl FromStr for PackageId {
    type Err = MriError;
    /// Parses the 52-character base32 form (without the scheme).
    fn from_str(s: &str) -> Result<Self, MriError> {
        // Characters first, then the length: a non-ASCII character makes the byte length
        // differ from what a reader counts, and "52 characters, got 52" helps nobody.
        if let Some((position, found)) = s
            .chars()
            .enumerate()
            .find(|(_, c)| !matches!(c, 'a'..='z' | '2'..='7'))
        {
            return Err(MriError::IdChar { position, found });
        }
        let b = s.as_bytes();
        if b.len() != ID_CHARS {
            return Err(MriError::IdLength(b.len()));
        }
        let mut out = [0u8; 32];
        let (mut acc, mut bits, mut n) = (0u32, 0u32, 0usize);
        for &c in b {
            // Checked above: lowercase letters and 2-7 only.
            let v = if c.is_ascii_lowercase() {
                c - b'a'
            } else {
                c - b'2' + 26
            };
            acc = (acc << 5) | u32::from(v);
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                out[n] = (acc >> bits) as u8;
                n += 1;
            }
            acc &= (1 << bits) - 1;
        }
        // 52 * 5 = 260 bits: the last 4 carry nothing and must be zero.
        if acc != 0 {
            return Err(MriError::IdTrailingBits);
        }
        Ok(Self(Hash(out)))
    }
}

/// A resolvable name: a package, or one file inside it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mri {
    /// The package.
    pub package: PackageId,
    /// A file inside the package, if the MRI names one.
    pub path: Option<PackagePath>,
}

/// Why a string is not an MRI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MriError {
    /// Does not start with `mri:`.
    #[error("an MRI starts with \"mri:\" (lowercase)")]
    Scheme,
    /// The id part has the wrong length.
    #[error("the package id of an MRI is {ID_CHARS} base32 characters, got {0}")]
    IdLength(usize),
    /// A character outside the lowercase base32 alphabet.
    #[error(
        "character {position} of the package id, {found:?}, is not lowercase base32 (a-z, 2-7)"
    )]
    IdChar {
        /// Zero-based position in the id.
        position: usize,
        /// The character.
        found: char,
    },
    /// The unused low bits of the last character are not zero.
    #[error("the last character of the package id is not canonical (its unused bits must be zero)")]
    IdTrailingBits,
    /// `mri:<id>/` with nothing after the slash.
    #[error("empty path after the package id (drop the trailing '/')")]
    EmptyPath,
    /// A `%` not followed by two uppercase hex digits.
    #[error("bad percent escape at byte {0} of the path (need '%' and two uppercase hex digits)")]
    BadEscape(usize),
    /// An escape of a byte that must be written as itself, or a byte that must be escaped.
    #[error(
        "byte {0} of the path is not in canonical form (escape exactly the bytes outside A-Z a-z 0-9 -._~!$&'()*+,;=:@)"
    )]
    NotCanonical(usize),
    /// The unescaped path is not UTF-8.
    #[error("the path is not UTF-8 once unescaped")]
    NotUtf8,
    /// The path itself is invalid.
    #[error("invalid path: {0}")]
    Path(#[from] PathError),
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b)
}

impl Mri {
    /// The MRI of a whole package.
    pub fn package(package: PackageId) -> Self {
        Self {
            package,
            path: None,
        }
    }

    /// The MRI of one file of a package.
    pub fn file(package: PackageId, path: PackagePath) -> Self {
        Self {
            package,
            path: Some(path),
        }
    }
}

impl fmt::Display for Mri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}", self.package)?;
        if let Some(path) = &self.path {
            f.write_str("/")?;
            for &b in path.as_str().as_bytes() {
                if b == b'/' || unreserved(b) {
                    write!(f, "{}", b as char)?;
                } else {
                    write!(f, "%{b:02X}")?;
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Mri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mri({self})")
    }
}

impl FromStr for Mri {
    type Err = MriError;
    fn from_str(s: &str) -> Result<Self, MriError> {
        let rest = s.strip_prefix(SCHEME).ok_or(MriError::Scheme)?;
        let (id, path) = match rest.split_once('/') {
            Some((id, path)) => (id, Some(path)),
            None => (rest, None),
        };
        let package: PackageId = id.parse()?;
        let path = match path {
            None => None,
            Some("") => return Err(MriError::EmptyPath),
            Some(p) => Some(unescape(p)?),
        };
        Ok(Self { package, path })
    }
}

fn unescape(p: &str) -> Result<PackagePath, MriError> {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let hex = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(MriError::BadEscape(i));
            };
            let v = (h << 4) | l;
            if v == b'/' || unreserved(v) {
                return Err(MriError::NotCanonical(i));
            }
            out.push(v);
            i += 3;
        } else if c == b'/' || unreserved(c) {
            out.push(c);
            i += 1;
        } else {
            return Err(MriError::NotCanonical(i));
        }
    }
    let s = String::from_utf8(out).map_err(|_| MriError::NotUtf8)?;
    Ok(PackagePath::new(s)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id() -> PackageId {
        PackageId::of_signed_manifest(b"manifest")
    }

    #[test]
    fn package_mri_round_trips_and_is_52_chars() {
        let m = Mri::package(id());
        let s = m.to_string();
        assert_eq!(s.len(), 4 + 52);
        assert!(s[4..].bytes().all(|c| ALPHABET.contains(&c)));
        assert_eq!(s.parse::<Mri>().unwrap(), m);
        // RFC 4648 test vector for the alphabet and bit order: "foobar" -> MZXW6YTBOI.
        let mut h = [0u8; 32];
        h[..6].copy_from_slice(b"foobar");
        assert!(PackageId(Hash(h)).to_string().starts_with("mzxw6ytboi"));
    }

    #[test]
    fn file_mri_escapes_exactly_what_it_must() {
        let p = PackagePath::new("site/my page #1/é?.html").unwrap();
        let m = Mri::file(id(), p);
        let s = m.to_string();
        assert!(s.ends_with("/site/my%20page%20%231/%C3%A9%3F.html"), "{s}");
        assert_eq!(s.parse::<Mri>().unwrap(), m);
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let good = Mri::package(id()).to_string();
        let idpart = &good[4..];
        let cases: Vec<(String, MriError)> = vec![
            (format!("MRI:{idpart}"), MriError::Scheme),
            (format!("ipfs:{idpart}"), MriError::Scheme),
            (format!("mri:{}", &idpart[..51]), MriError::IdLength(51)),
            (
                format!("mri:{}A", &idpart[..51]),
                MriError::IdChar {
                    position: 51,
                    found: 'A',
                },
            ),
            (
                format!("mri:{}1", &idpart[..51]),
                MriError::IdChar {
                    position: 51,
                    found: '1',
                },
            ),
            (format!("mri:{}b", &idpart[..51]), MriError::IdTrailingBits),
            (format!("{good}/"), MriError::EmptyPath),
            // 52 characters but 53 bytes: the error is the character, not the length.
            (
                format!("mri:{}é", &idpart[..51]),
                MriError::IdChar {
                    position: 51,
                    found: 'é',
                },
            ),
            (
                format!("mri:{}é", &idpart[..50]),
                MriError::IdChar {
                    position: 50,
                    found: 'é',
                },
            ),
            (format!("{good}/a%2"), MriError::BadEscape(1)),
            (format!("{good}/a%2f"), MriError::BadEscape(1)),
            (format!("{good}/%41"), MriError::NotCanonical(0)),
            (format!("{good}/a%2Fb"), MriError::NotCanonical(1)),
            (format!("{good}/a b"), MriError::NotCanonical(1)),
            (format!("{good}/%FF"), MriError::NotUtf8),
            (
                format!("{good}/../x"),
                MriError::Path(PathError::DotComponent("..", 0)),
            ),
            (
                format!("{good}/a//b"),
                MriError::Path(PathError::EmptyComponent(2)),
            ),
        ];
        for (s, e) in cases {
            assert_eq!(s.parse::<Mri>(), Err(e), "{s}");
        }
        // The last id character: only the top bit of its 5 carries data; "a" and "q"
        // (top bit clear and set) are canonical, anything with low bits is not.
        let base = &idpart[..51];
        for (c, ok) in [('a', true), ('q', true), ('b', false), ('r', false)] {
            assert_eq!(format!("{base}{c}").parse::<PackageId>().is_ok(), ok, "{c}");
        }
    }

    proptest! {
        #[test]
        fn round_trip(bytes: [u8; 32], path in proptest::option::of("[a-z0-9 é%#?/._-]{1,30}")) {
            let package = PackageId(Hash(bytes));
            let path = path.and_then(|p| PackagePath::new(p).ok());
            let m = Mri { package, path };
            let s = m.to_string();
            prop_assert_eq!(s.parse::<Mri>().unwrap(), m);
        }

        #[test]
        fn parse_never_panics_and_what_parses_prints_back(s in "mri:[a-z2-7A-Z0-9]{50,53}(/[\\PC%]{0,20})?") {
            if let Ok(m) = s.parse::<Mri>() {
                prop_assert_eq!(m.to_string(), s);
            }
        }
    }
}
