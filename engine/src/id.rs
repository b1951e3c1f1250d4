//! Ids: one 32-byte [`Id`] and a typed newtype per kind of object, so that a blob id can
//! never be passed where a pack id is expected.
//!
//! Ids print as lowercase hex. In binary encodings (CBOR trees and manifests) they are
//! 32-byte byte strings; in human-readable ones (JSON) they are hex strings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length of every id in bytes.
pub const ID_LEN: usize = 32;

/// A 32-byte identifier: a BLAKE3 hash (keyed or not, see the typed ids) or random bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Id([u8; ID_LEN]);

impl Id {
    /// Wraps raw bytes.
    #[must_use]
    pub const fn from_bytes(bytes: [u8; ID_LEN]) -> Self {
        Self(bytes)
    }

    /// Reads an id from a slice that must be exactly 32 bytes long.
    #[must_use]
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; ID_LEN]>::try_from(bytes).ok().map(Self)
    }

    /// A fresh random id from the operating system's generator.
    ///
    /// # Panics
    /// If the operating system has no random source (never on Linux).
    #[must_use]
    pub fn random() -> Self {
        Self(crate::crypto::random_array())
    }

    /// The unkeyed BLAKE3 hash of `data` (used to name files by their content).
    #[must_use]
    pub fn hash_of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; ID_LEN] {
        &self.0
    }

    #[must_use]
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first `n` hex digits, for display.
    #[must_use]
    pub fn short(&self, n: usize) -> String {
        let mut s = self.to_hex();
        s.truncate(n);
        s
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.short(12))
    }
}

/// Error for text that is not 64 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("not an id (expected 64 hex digits): {0:?}")]
pub struct ParseIdError(pub String);

impl FromStr for Id {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; ID_LEN];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseIdError(s.to_owned()))?;
        Ok(Self(out))
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_hex())
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            let b: serde_bytes::ByteBuf = serde_bytes::ByteBuf::deserialize(d)?;
            Self::from_slice(&b)
                .ok_or_else(|| serde::de::Error::invalid_length(b.len(), &"32 bytes"))
        }
    }
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
        #[serde(transparent)]
        pub struct $name(pub Id);

        impl $name {
            #[must_use]
            pub fn to_hex(&self) -> String {
                self.0.to_hex()
            }
            #[must_use]
            pub fn short(&self) -> String {
                self.0.short(8)
            }
            #[must_use]
            pub const fn as_bytes(&self) -> &[u8; ID_LEN] {
                self.0.as_bytes()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map(Self)
            }
        }
    };
}

typed_id!(
    /// A blob: `blake3::keyed_hash(id_key, plaintext)`.
    BlobId
);
typed_id!(
    /// A pack file: the unkeyed BLAKE3 hash of the whole file.
    PackId
);
typed_id!(
    /// A snapshot manifest file: the unkeyed BLAKE3 hash of the whole file.
    SnapshotId
);
typed_id!(
    /// A key file: random.
    KeyId
);
typed_id!(
    /// A repository: random, chosen at `init`.
    RepoId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = Id::hash_of(b"x");
        assert_eq!(id.to_hex().parse::<Id>().ok(), Some(id));
        assert!("zz".parse::<Id>().is_err());
        assert_eq!(BlobId(id).short().len(), 8);
    }
}
