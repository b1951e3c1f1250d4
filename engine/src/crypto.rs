//! Keys and authenticated encryption.
//!
//! A repository has one [`MasterKey`]: an AES-256-GCM key for data, a BLAKE3 key for blob
//! ids (so the storage host cannot confirm guesses about content) and a BLAKE3 key for
//! MACs of plain files (`config`). Every sealed message is `nonce (12) || ciphertext || tag (16)`
//! with a fresh random nonce, and carries associated data that binds it to its place
//! (a blob's id and kind, a pack trailer, a manifest), so nothing can be swapped unnoticed.
//! With encryption `none`, sealing is the identity and integrity rests on the keyed ids.
//!
//! Password wrapping of the master key (argon2id) lives in [`crate::keyfile`].

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{Error, Result};
use crate::id::BlobId;

pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed message adds to its plaintext when encryption is on.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Fills an array from the operating system's random source.
///
/// # Panics
/// If the operating system has no random source; there is nothing safe to do then.
#[must_use]
pub fn random_array<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    #[allow(clippy::expect_used)]
    getrandom::getrandom(&mut out).expect("the operating system's random source failed");
    out
}

/// Whether data is encrypted. Chosen at `init`, recorded in `config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encryption {
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    #[serde(rename = "none")]
    None,
}

/// The repository's secret keys. Never written anywhere unwrapped (except with
/// encryption `none`, where there is nothing to protect).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey {
    data: [u8; 32],
    id: [u8; 32],
    mac: [u8; 32],
}

impl MasterKey {
    pub const LEN: usize = 96;

    #[must_use]
    pub fn generate() -> Self {
        Self {
            data: random_array(),
            id: random_array(),
            mac: random_array(),
        }
    }

    #[must_use]
    pub fn to_bytes(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let mut v = Vec::with_capacity(Self::LEN);
        v.extend_from_slice(&self.data);
        v.extend_from_slice(&self.id);
        v.extend_from_slice(&self.mac);
        zeroize::Zeroizing::new(v)
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        if b.len() != Self::LEN {
            return Err(Error::corrupt("master key", "wrong length"));
        }
        let mut k = Self {
            data: [0; 32],
            id: [0; 32],
            mac: [0; 32],
        };
        k.data.copy_from_slice(&b[..32]);
        k.id.copy_from_slice(&b[32..64]);
        k.mac.copy_from_slice(&b[64..]);
        Ok(k)
    }
}

/// Encryption and hashing with one repository's keys.
#[derive(Clone)]
pub struct Crypto {
    key: MasterKey,
    encryption: Encryption,
    cipher: Aes256Gcm,
}

impl Crypto {
    #[must_use]
    pub fn new(key: MasterKey, encryption: Encryption) -> Self {
        let cipher = Aes256Gcm::new((&key.data).into());
        Self {
            key,
            encryption,
            cipher,
        }
    }

    #[must_use]
    pub fn encryption(&self) -> Encryption {
        self.encryption
    }

    #[must_use]
    pub fn master_key(&self) -> &MasterKey {
        &self.key
    }

    /// The id of a blob with this plaintext.
    #[must_use]
    pub fn blob_id(&self, plaintext: &[u8]) -> BlobId {
        BlobId(crate::id::Id::from_bytes(
            *blake3::keyed_hash(&self.key.id, plaintext).as_bytes(),
        ))
    }

    /// A MAC over `data` (for files stored in the clear, such as `config`).
    #[must_use]
    pub fn mac(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.key.mac, data).as_bytes()
    }

    /// Bytes before the plaintext in a sealed message (the nonce; none without
    /// encryption). See [`Self::seal_slice`].
    #[must_use]
    pub fn seal_prefix_len(&self) -> usize {
        match self.encryption {
            Encryption::None => 0,
            Encryption::Aes256Gcm => NONCE_LEN,
        }
    }

    /// Bytes after the plaintext in a sealed message (the tag; none without encryption).
    #[must_use]
    pub fn seal_suffix_len(&self) -> usize {
        match self.encryption {
            Encryption::None => 0,
            Encryption::Aes256Gcm => TAG_LEN,
        }
    }

    /// Seals in place a plaintext of `plain_len` bytes that the caller placed at
    /// `buf[seal_prefix_len()..]`; `buf` has room for the suffix after it. Returns the
    /// sealed length (from `buf[0]`): nonce, ciphertext, tag. Associated data `aad` is
    /// authenticated, not stored. Lets a caller reuse one buffer for many messages.
    pub fn seal_slice(&self, buf: &mut [u8], plain_len: usize, aad: &[u8]) -> usize {
        if self.encryption == Encryption::None {
            return plain_len;
        }
        let nonce: [u8; NONCE_LEN] = random_array();
        buf[..NONCE_LEN].copy_from_slice(&nonce);
        let end = NONCE_LEN + plain_len;
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut buf[NONCE_LEN..end])
            // AES-GCM fails only for messages over 64 GiB, which we never build.
            .unwrap_or_else(|_| unreachable!("AES-GCM message too long"));
        buf[end..end + TAG_LEN].copy_from_slice(&tag);
        end + TAG_LEN
    }

    /// Seals a copy of `plaintext`.
    #[must_use]
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let start = self.seal_prefix_len();
        let mut buf = vec![0u8; start + plaintext.len() + self.seal_suffix_len()];
        buf[start..start + plaintext.len()].copy_from_slice(plaintext);
        let len = self.seal_slice(&mut buf, plaintext.len(), aad);
        buf.truncate(len);
        buf
    }

    /// Opens a sealed message in its own buffer (no copy); returns the plaintext's range
    /// within `sealed`.
    pub fn open_in_place(
        &self,
        sealed: &mut [u8],
        aad: &[u8],
        what: &dyn Fn() -> String,
    ) -> Result<std::ops::Range<usize>> {
        if self.encryption == Encryption::None {
            return Ok(0..sealed.len());
        }
        if sealed.len() < SEAL_OVERHEAD {
            return Err(Error::corrupt(
                what(),
                "sealed data shorter than nonce and tag",
            ));
        }
        let end = sealed.len() - TAG_LEN;
        let (head, tag) = sealed.split_at_mut(end);
        let (nonce, ct) = head.split_at_mut(NONCE_LEN);
        self.cipher
            .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, ct, (&*tag).into())
            .map_err(|_| {
                Error::corrupt(what(), "authentication failed (data damaged or altered)")
            })?;
        Ok(NONCE_LEN..end)
    }

    /// Opens a sealed message; `what` names it in the error.
    pub fn open(&self, sealed: &[u8], aad: &[u8], what: &dyn Fn() -> String) -> Result<Vec<u8>> {
        if self.encryption == Encryption::None {
            return Ok(sealed.to_vec());
        }
        if sealed.len() < SEAL_OVERHEAD {
            return Err(Error::corrupt(
                what(),
                "sealed data shorter than nonce and tag",
            ));
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut out = ct.to_vec();
        self.cipher
            .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, &mut out, tag.into())
            .map_err(|_| {
                Error::corrupt(what(), "authentication failed (data damaged or altered)")
            })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let c = Crypto::new(MasterKey::generate(), Encryption::Aes256Gcm);
        let sealed = c.seal(b"hello", b"aad");
        assert_eq!(sealed.len(), 5 + SEAL_OVERHEAD);
        let what = || "x".to_string();
        assert_eq!(c.open(&sealed, b"aad", &what).ok(), Some(b"hello".to_vec()));
        assert!(c.open(&sealed, b"other", &what).is_err());
        let mut bad = sealed.clone();
        bad[NONCE_LEN] ^= 1;
        assert!(c.open(&bad, b"aad", &what).is_err());
        assert!(c.open(&sealed[..10], b"aad", &what).is_err());
    }

    #[test]
    fn ids_are_keyed() {
        let a = Crypto::new(MasterKey::generate(), Encryption::Aes256Gcm);
        let b = Crypto::new(MasterKey::generate(), Encryption::Aes256Gcm);
        assert_ne!(a.blob_id(b"x"), b.blob_id(b"x"));
        assert_eq!(a.blob_id(b"x"), a.blob_id(b"x"));
    }
}
