//! [`Hash`]: a BLAKE3 hash, the name of every blob and (through the MRI) every package.

use std::{fmt, str::FromStr};

/// A 32-byte BLAKE3 hash. Shown and parsed as 64 lowercase hex digits: the form blob
/// files are named by. (An MRI shows a package's hash in base32; see the MRI module.)
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The BLAKE3 hash of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

impl From<Hash> for blake3::Hash {
    fn from(h: Hash) -> Self {
        blake3::Hash::from_bytes(h.0)
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

/// Why a string is not a [`Hash`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseHashError {
    /// Not exactly 64 characters.
    #[error("a hash is 64 hex digits, got {0} characters")]
    Length(usize),
    /// A character that is not a lowercase hex digit.
    #[error("character {position} of the hash is not a lowercase hex digit")]
    Digit {
        /// Zero-based position of the offending character.
        position: usize,
    },
}

impl FromStr for Hash {
    type Err = ParseHashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(ParseHashError::Length(s.chars().count()));
        }
        let digit = |position: usize| match bytes[position] {
            c @ b'0'..=b'9' => Ok(c - b'0'),
            c @ b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(ParseHashError::Digit { position }),
        };
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = (digit(2 * i)? << 4) | digit(2 * i + 1)?;
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let h = Hash::of(b"myconet");
        let s = h.to_string();
        assert_eq!(s, blake3::hash(b"myconet").to_hex().as_str());
        assert_eq!(s.parse::<Hash>(), Ok(h));
    }

    #[test]
    fn parse_names_what_is_wrong() {
        assert_eq!("ab".parse::<Hash>(), Err(ParseHashError::Length(2)));
        let upper = Hash::of(b"x").to_string().to_uppercase();
        assert!(matches!(
            upper.parse::<Hash>(),
            Err(ParseHashError::Digit { .. })
        ));
    }
}
