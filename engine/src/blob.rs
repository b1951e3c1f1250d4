//! Blobs: the unit of dedup. Encoding is compress (zstd, only when it shrinks) then seal.
//!
//! Stored form: `seal(flag (1) || payload, aad = "cairn.blob.v1" || kind (1) || id (32))`,
//! flag 0 = payload is the plaintext, 1 = payload is a zstd frame. Decoding checks the
//! seal, decompresses with a size cap, and re-hashes the plaintext against the id, so a
//! blob that decodes is exactly the blob asked for.

use std::cell::RefCell;

use serde::{Deserialize, Serialize};

use crate::crypto::Crypto;
use crate::error::{Error, Result};
use crate::id::BlobId;

/// The largest plaintext a blob may have (4x the largest chunk: trees may be big).
pub const MAX_BLOB_LEN: usize = 64 * 1024 * 1024;

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum BlobKind {
    /// File or stream content.
    Data = 0,
    /// A directory listing ([`crate::tree::Tree`]).
    Tree = 1,
}

impl BlobKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Data),
            1 => Some(Self::Tree),
            _ => None,
        }
    }
}

const FLAG_RAW: u8 = 0;
const FLAG_ZSTD: u8 = 1;

fn aad(kind: BlobKind, id: &BlobId) -> [u8; 46] {
    let mut a = [0u8; 46];
    a[..13].copy_from_slice(b"cairn.blob.v1");
    a[13] = kind as u8;
    a[14..].copy_from_slice(id.as_bytes());
    a
}

/// Encodes a blob for storage. `level` 0 disables compression.
pub fn encode(crypto: &Crypto, kind: BlobKind, id: &BlobId, plain: &[u8], level: i32) -> Vec<u8> {
    let mut buf = Vec::new();
    let len = encode_into(crypto, kind, id, plain, level, &mut buf);
    buf.truncate(len);
    buf
}

/// Encodes a blob into `buf`, which is reused from one blob to the next: its length
/// only grows (so it is zeroed once, not per blob). Returns the stored length: the blob
/// is `buf[..len]`. Compresses straight into the sealed message, without a copy.
pub fn encode_into(
    crypto: &Crypto,
    kind: BlobKind,
    id: &BlobId,
    plain: &[u8],
    level: i32,
    buf: &mut Vec<u8>,
) -> usize {
    let body = crypto.seal_prefix_len() + 1;
    let room = zstd::zstd_safe::compress_bound(plain.len()).max(plain.len());
    let need = body + room + crypto.seal_suffix_len();
    if buf.len() < need {
        buf.resize(need, 0);
    }
    // Keep the compressed form only when it saves at least 1/64 of the size.
    let compressed = (level > 0)
        .then(|| compress_into(plain, level, &mut buf[body..body + room]))
        .flatten()
        .filter(|&n| n + n / 64 < plain.len());
    let payload_len = match compressed {
        Some(n) => {
            buf[body - 1] = FLAG_ZSTD;
            n
        }
        None => {
            buf[body - 1] = FLAG_RAW;
            buf[body..body + plain.len()].copy_from_slice(plain);
            plain.len()
        }
    };
    crypto.seal_slice(buf, 1 + payload_len, &aad(kind, id))
}

thread_local! {
    /// zstd contexts are costly to create: one per thread, reused.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses `plain` into `out`; `None` when it does not fit (or zstd fails).
fn compress_into(plain: &[u8], level: i32, out: &mut [u8]) -> Option<usize> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        slot.as_mut()?.1.compress_to_buffer(plain, out).ok()
    })
}

fn decompress(body: &[u8], raw_len: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress(body, raw_len),
            None => zstd::bulk::decompress(body, raw_len),
        }
    })
}

/// How much a decoded blob is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Re-hash the plaintext against the id (always, with encryption `none`).
    Hash,
    /// Trust the AEAD tag, which authenticates the blob under its id and kind: enough
    /// to know the blob is the one a key holder stored for this id. For hot read paths
    /// (the mount); restore and check use [`Verify::Hash`].
    Seal,
}

/// Decodes a stored blob (decrypting in its own buffer) and verifies it is the blob
/// `id`. `raw_len` (from the pack trailer) bounds decompression.
pub fn decode(
    crypto: &Crypto,
    kind: BlobKind,
    id: &BlobId,
    mut stored: Vec<u8>,
    raw_len: usize,
    verify: Verify,
) -> Result<Vec<u8>> {
    let plain = match open_payload(crypto, kind, id, &mut stored, raw_len)? {
        Payload::Raw(range) => {
            // Reuse the buffer: drop the nonce, the flag and the tag.
            stored.truncate(range.end);
            stored.drain(..range.start);
            stored
        }
        Payload::Decompressed(plain) => plain,
    };
    check_plain(crypto, id, &plain, raw_len, verify)?;
    Ok(plain)
}

/// Like [`decode`] for a blob that is part of a larger buffer (a read that covered
/// several blobs): decrypts within `stored`, and borrows it when the blob was stored
/// uncompressed.
pub fn decode_in_place<'a>(
    crypto: &Crypto,
    kind: BlobKind,
    id: &BlobId,
    stored: &'a mut [u8],
    raw_len: usize,
    verify: Verify,
) -> Result<std::borrow::Cow<'a, [u8]>> {
    let plain = match open_payload(crypto, kind, id, stored, raw_len)? {
        Payload::Raw(range) => std::borrow::Cow::Borrowed(&stored[range]),
        Payload::Decompressed(plain) => std::borrow::Cow::Owned(plain),
    };
    check_plain(crypto, id, &plain, raw_len, verify)?;
    Ok(plain)
}

/// A blob's plaintext after the seal is opened: where it lies in the stored buffer, or
/// decompressed into a new one.
enum Payload {
    Raw(std::ops::Range<usize>),
    Decompressed(Vec<u8>),
}

fn open_payload(
    crypto: &Crypto,
    kind: BlobKind,
    id: &BlobId,
    stored: &mut [u8],
    raw_len: usize,
) -> Result<Payload> {
    let what = || format!("blob {id}");
    if raw_len > MAX_BLOB_LEN {
        return Err(Error::corrupt(what(), "length beyond the format's limit"));
    }
    let range = crypto.open_in_place(stored, &aad(kind, id), &what)?;
    let (&flag, body) = stored[range.clone()]
        .split_first()
        .ok_or_else(|| Error::corrupt(what(), "empty payload"))?;
    match flag {
        FLAG_RAW => Ok(Payload::Raw(range.start + 1..range.end)),
        FLAG_ZSTD => decompress(body, raw_len)
            .map(Payload::Decompressed)
            .map_err(|e| Error::corrupt(what(), format!("zstd: {e}"))),
        _ => Err(Error::corrupt(what(), format!("unknown flag {flag}"))),
    }
}

/// Checks a decoded plaintext's length, and its hash when `verify` (or the lack of
/// encryption) asks for it.
fn check_plain(
    crypto: &Crypto,
    id: &BlobId,
    plain: &[u8],
    raw_len: usize,
    verify: Verify,
) -> Result<()> {
    let what = || format!("blob {id}");
    if plain.len() != raw_len {
        return Err(Error::corrupt(
            what(),
            "length differs from the pack trailer",
        ));
    }
    let check_hash =
        verify == Verify::Hash || crypto.encryption() == crate::crypto::Encryption::None;
    if check_hash && crypto.blob_id(plain) != *id {
        return Err(Error::corrupt(what(), "content does not match its id"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Encryption, MasterKey};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 0..5000),
                      repeat in 1usize..4, level in 0i32..4, enc in any::<bool>()) {
            let data = data.repeat(repeat);
            let c = Crypto::new(MasterKey::generate(),
                if enc { Encryption::Aes256Gcm } else { Encryption::None });
            let id = c.blob_id(&data);
            let stored = encode(&c, BlobKind::Data, &id, &data, level);
            prop_assert_eq!(decode(&c, BlobKind::Data, &id, stored.clone(), data.len(), Verify::Hash).unwrap(), data.clone());
            // Within a larger buffer, as a read covering several blobs gives it.
            let mut around = [vec![9u8; 7], stored.clone(), vec![9u8; 5]].concat();
            let end = around.len() - 5;
            let plain = decode_in_place(&c, BlobKind::Data, &id, &mut around[7..end], data.len(), Verify::Hash).unwrap();
            prop_assert_eq!(&plain[..], &data[..]);
            // Wrong kind or id is refused.
            if enc {
                prop_assert!(decode(&c, BlobKind::Tree, &id, stored.clone(), data.len(), Verify::Hash).is_err());
            }
            let other = c.blob_id(b"other");
            prop_assert!(decode(&c, BlobKind::Data, &other, stored.clone(), data.len(), Verify::Seal).is_err());
        }

        #[test]
        fn flipped_bytes_are_detected(data in proptest::collection::vec(any::<u8>(), 1..3000),
                                      pos in any::<usize>(), enc in any::<bool>()) {
            let c = Crypto::new(MasterKey::generate(),
                if enc { Encryption::Aes256Gcm } else { Encryption::None });
            let id = c.blob_id(&data);
            let mut stored = encode(&c, BlobKind::Data, &id, &data, 3);
            let p = pos % stored.len();
            stored[p] ^= 0x40;
            prop_assert!(decode(&c, BlobKind::Data, &id, stored.clone(), data.len(), Verify::Seal).is_err());
        }
    }

    #[test]
    fn compressible_data_shrinks() {
        let c = Crypto::new(MasterKey::generate(), Encryption::Aes256Gcm);
        let data = vec![7u8; 100_000];
        let id = c.blob_id(&data);
        assert!(encode(&c, BlobKind::Data, &id, &data, 3).len() < 1000);
    }
}
