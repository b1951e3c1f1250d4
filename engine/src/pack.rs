//! Pack files: many stored blobs and a sealed trailer that lists them.
//!
//! Layout (all integers little-endian):
//! ```text
//! header   magic "\x89CRNPACK" (8) | version u32 = 1
//! blobs    stored blobs back to back (see crate::blob)
//! trailer  seal(entries, aad = "cairn.pack-trailer.v1")
//!          entries: count u32 | count x (kind u8 | id 32 | offset u64 | length u32 | raw_length u32)
//! footer   trailer length u32 | magic "CRNPKEND" (8)
//! ```
//! A pack's id is the BLAKE3 hash of the whole file, so `check` can verify a pack without
//! keys. The trailer makes every pack self-describing: the index is rebuilt from them.

use crate::blob::{BlobKind, MAX_BLOB_LEN};
use crate::crypto::Crypto;
use crate::error::{Error, Result};
use crate::id::{BlobId, Id, PackId};

pub const MAGIC: &[u8; 8] = b"\x89CRNPACK";
pub const END_MAGIC: &[u8; 8] = b"CRNPKEND";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 12;
pub const FOOTER_LEN: usize = 12;
const ENTRY_LEN: usize = 1 + 32 + 8 + 4 + 4;
const TRAILER_AAD: &[u8] = b"cairn.pack-trailer.v1";

/// Where one blob lives inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub id: BlobId,
    pub kind: BlobKind,
    /// Offset of the stored blob from the start of the pack file.
    pub offset: u64,
    /// Length of the stored (compressed, sealed) blob.
    pub length: u32,
    /// Length of the plaintext.
    pub raw_length: u32,
}

/// Builds one pack, writing it to `out` as blobs arrive (a [`crate::store::NewFile`]
/// in a backup, a `Vec<u8>` in tests): only the trailer's entries stay in memory. The
/// pack's id is hashed on the way.
pub struct PackWriter<W> {
    out: W,
    hasher: blake3::Hasher,
    len: u64,
    entries: Vec<PackEntry>,
}

impl<W: std::io::Write> PackWriter<W> {
    /// Starts a pack in `out` (writes the header).
    pub fn new(out: W) -> std::io::Result<Self> {
        let mut w = Self {
            out,
            hasher: blake3::Hasher::new(),
            len: 0,
            entries: Vec::new(),
        };
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8..].copy_from_slice(&VERSION.to_le_bytes());
        w.put(&header)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Appends a stored blob.
    pub fn add(
        &mut self,
        id: BlobId,
        kind: BlobKind,
        stored: &[u8],
        raw_length: usize,
    ) -> std::io::Result<()> {
        let entry = PackEntry {
            id,
            kind,
            offset: self.len,
            length: u32::try_from(stored.len()).unwrap_or(u32::MAX),
            raw_length: u32::try_from(raw_length).unwrap_or(u32::MAX),
        };
        self.put(stored)?;
        self.entries.push(entry);
        Ok(())
    }

    /// Bytes written so far.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.len
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The blobs added so far.
    #[must_use]
    pub fn entries(&self) -> &[PackEntry] {
        &self.entries
    }

    /// Appends the sealed trailer and the footer; returns the pack's id, its length, its
    /// entries, and the sink (to commit it under the id).
    pub fn finish(mut self, crypto: &Crypto) -> std::io::Result<FinishedPack<W>> {
        let mut plain = Vec::with_capacity(4 + self.entries.len() * ENTRY_LEN);
        plain.extend_from_slice(&u32::try_from(self.entries.len()).unwrap_or(0).to_le_bytes());
        for e in &self.entries {
            plain.push(e.kind as u8);
            plain.extend_from_slice(e.id.as_bytes());
            plain.extend_from_slice(&e.offset.to_le_bytes());
            plain.extend_from_slice(&e.length.to_le_bytes());
            plain.extend_from_slice(&e.raw_length.to_le_bytes());
        }
        let sealed = crypto.seal(&plain, TRAILER_AAD);
        self.put(&sealed)?;
        let mut footer = [0u8; FOOTER_LEN];
        footer[..4].copy_from_slice(&u32::try_from(sealed.len()).unwrap_or(0).to_le_bytes());
        footer[4..].copy_from_slice(END_MAGIC);
        self.put(&footer)?;
        Ok(FinishedPack {
            id: PackId(Id::from_bytes(*self.hasher.finalize().as_bytes())),
            len: self.len,
            entries: self.entries,
            out: self.out,
        })
    }
}

/// A pack whose last byte is written.
pub struct FinishedPack<W> {
    /// The BLAKE3 hash of the whole file.
    pub id: PackId,
    pub len: u64,
    pub entries: Vec<PackEntry>,
    pub out: W,
}

/// Reads the trailer length from a pack's footer; `pack_size` is the file size.
pub fn trailer_span(pack: &PackId, footer: &[u8], pack_size: u64) -> Result<(u64, usize)> {
    let what = || format!("pack {pack}");
    if footer.len() != FOOTER_LEN || &footer[4..] != END_MAGIC {
        return Err(Error::corrupt(
            what(),
            "bad footer (truncated or not a pack)",
        ));
    }
    let len = u64::from(u32::from_le_bytes([
        footer[0], footer[1], footer[2], footer[3],
    ]));
    let min = (HEADER_LEN + FOOTER_LEN) as u64;
    if pack_size < min || len > pack_size - min {
        return Err(Error::corrupt(what(), "trailer length beyond the file"));
    }
    let start = pack_size - FOOTER_LEN as u64 - len;
    Ok((start, len as usize))
}

/// Parses a sealed trailer that starts at `trailer_start` of the pack file.
pub fn parse_trailer(
    crypto: &Crypto,
    pack: &PackId,
    sealed: &[u8],
    trailer_start: u64,
) -> Result<Vec<PackEntry>> {
    let what = || format!("pack {pack}");
    let plain = crypto.open(sealed, TRAILER_AAD, &what)?;
    if plain.len() < 4 {
        return Err(Error::corrupt(what(), "trailer too short"));
    }
    let count = u32::from_le_bytes([plain[0], plain[1], plain[2], plain[3]]) as usize;
    if plain.len() != 4 + count * ENTRY_LEN {
        return Err(Error::corrupt(
            what(),
            "trailer length does not match its count",
        ));
    }
    let mut out = Vec::with_capacity(count);
    let mut next_free = HEADER_LEN as u64;
    for rec in plain[4..].chunks_exact(ENTRY_LEN) {
        let kind = BlobKind::from_u8(rec[0])
            .ok_or_else(|| Error::corrupt(what(), format!("unknown blob kind {}", rec[0])))?;
        let id = BlobId(Id::from_slice(&rec[1..33]).unwrap_or_default());
        let le4 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&rec[33..41]);
        let e = PackEntry {
            id,
            kind,
            offset: u64::from_le_bytes(off),
            length: le4(&rec[41..45]),
            raw_length: le4(&rec[45..49]),
        };
        // Blobs are in file order, do not overlap, and end before the trailer (an end
        // beyond u64 is out of bounds too: the trailer of an unencrypted pack is not
        // authenticated, and anyone can write it).
        let end = e.offset.checked_add(u64::from(e.length));
        if e.offset < next_free
            || end.is_none_or(|end| end > trailer_start)
            || e.raw_length as usize > MAX_BLOB_LEN
        {
            return Err(Error::corrupt(
                what(),
                format!("entry for blob {id} out of bounds"),
            ));
        }
        next_free = end.unwrap_or(u64::MAX);
        out.push(e);
    }
    Ok(out)
}

/// Checks a pack's header: the magic, and a version this program reads.
pub fn check_header(pack: &PackId, header: &[u8]) -> Result<()> {
    if header.len() < HEADER_LEN || &header[..8] != MAGIC {
        return Err(Error::corrupt(
            format!("pack {pack}"),
            "bad header (not a pack)",
        ));
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != VERSION {
        return Err(Error::corrupt(
            format!("pack {pack}"),
            if version > VERSION {
                format!(
                    "pack format version {version}, newer than this program reads ({VERSION}); \
                     upgrade cairn"
                )
            } else {
                format!("pack format version {version} does not exist")
            },
        ));
    }
    Ok(())
}

/// Parses a whole pack held in memory (used by tests and by `check`).
pub fn parse_pack(crypto: &Crypto, pack: &PackId, bytes: &[u8]) -> Result<Vec<PackEntry>> {
    if bytes.len() < HEADER_LEN + FOOTER_LEN {
        return Err(Error::corrupt(
            format!("pack {pack}"),
            "shorter than a pack",
        ));
    }
    check_header(pack, &bytes[..HEADER_LEN])?;
    let (start, len) = trailer_span(pack, &bytes[bytes.len() - FOOTER_LEN..], bytes.len() as u64)?;
    let s = usize::try_from(start).unwrap_or(usize::MAX);
    let sealed = s
        .checked_add(len)
        .and_then(|end| bytes.get(s..end))
        .ok_or_else(|| Error::corrupt(format!("pack {pack}"), "trailer beyond the file"))?;
    parse_trailer(crypto, pack, sealed, start)
}

/// The stored bytes of `entry` within the whole pack `bytes`, once they decrypt, decompress
/// and hash to the entry's id (never copy or trust damage).
pub fn verified_blob<'b>(crypto: &Crypto, bytes: &'b [u8], entry: &PackEntry) -> Result<&'b [u8]> {
    let start = usize::try_from(entry.offset).unwrap_or(usize::MAX);
    let stored = bytes
        .get(start..start.saturating_add(entry.length as usize))
        .ok_or_else(|| {
            Error::corrupt(format!("blob {}", entry.id), "beyond the end of its pack")
        })?;
    crate::blob::decode(
        crypto,
        entry.kind,
        &entry.id,
        stored.to_vec(),
        entry.raw_length as usize,
        crate::blob::Verify::Hash,
    )?;
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob;
    use crate::crypto::{Encryption, MasterKey};
    use proptest::prelude::*;

    /// An unencrypted pack's trailer is not authenticated: whatever its numbers say, the
    /// parse is an error, never an overflow.
    #[test]
    fn a_crafted_trailer_with_a_huge_offset_is_out_of_bounds() {
        let c = Crypto::new(MasterKey::generate(), Encryption::None);
        for (offset, length) in [
            (u64::MAX - 3, 10u32),
            (u64::MAX, u32::MAX),
            (12, u32::MAX),
            (1 << 63, 1),
        ] {
            let mut plain = 1u32.to_le_bytes().to_vec();
            plain.push(0);
            plain.extend_from_slice(&[7u8; 32]);
            plain.extend_from_slice(&offset.to_le_bytes());
            plain.extend_from_slice(&length.to_le_bytes());
            plain.extend_from_slice(&10u32.to_le_bytes());
            let err = parse_trailer(&c, &PackId::default(), &plain, 1000).unwrap_err();
            assert!(err.to_string().contains("out of bounds"), "{err}");
        }
    }

    #[test]
    fn a_pack_of_another_version_is_refused_by_name() {
        let c = Crypto::new(MasterKey::generate(), Encryption::None);
        let FinishedPack { id, mut out, .. } =
            PackWriter::new(Vec::new()).unwrap().finish(&c).unwrap();
        parse_pack(&c, &id, &out).unwrap();
        out[8..12].copy_from_slice(&2u32.to_le_bytes());
        let err = parse_pack(&c, &id, &out).unwrap_err();
        assert!(err.to_string().contains("newer than this program"), "{err}");
        out[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(parse_pack(&c, &id, &out).is_err());
        out[0] = b'X';
        assert!(parse_pack(&c, &id, &out)
            .unwrap_err()
            .to_string()
            .contains("not a pack"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn pack_round_trip(blobs in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..2000), 0..20), enc in any::<bool>()) {
            let c = Crypto::new(MasterKey::generate(),
                if enc { Encryption::Aes256Gcm } else { Encryption::None });
            let mut w = PackWriter::new(Vec::new()).unwrap();
            for b in &blobs {
                let id = c.blob_id(b);
                w.add(id, BlobKind::Data, &blob::encode(&c, BlobKind::Data, &id, b, 3), b.len()).unwrap();
            }
            let FinishedPack { id, out: bytes, entries, len } = w.finish(&c).unwrap();
            prop_assert_eq!(len, bytes.len() as u64);
            prop_assert_eq!(PackId(Id::hash_of(&bytes)), id);
            let parsed = parse_pack(&c, &id, &bytes).unwrap();
            prop_assert_eq!(&parsed, &entries);
            for (e, b) in parsed.iter().zip(&blobs) {
                let s = e.offset as usize;
                let stored = &bytes[s..s + e.length as usize];
                prop_assert_eq!(&blob::decode(&c, e.kind, &e.id, stored.to_vec(), e.raw_length as usize, blob::Verify::Hash).unwrap(), b);
            }
        }

        #[test]
        fn truncated_or_garbage_packs_error(cut in any::<usize>(), garbage in proptest::collection::vec(any::<u8>(), 0..200)) {
            let c = Crypto::new(MasterKey::generate(), Encryption::Aes256Gcm);
            let mut w = PackWriter::new(Vec::new()).unwrap();
            let id = c.blob_id(b"abc");
            w.add(id, BlobKind::Data, &blob::encode(&c, BlobKind::Data, &id, b"abc", 3), 3).unwrap();
            let FinishedPack { id: pid, out: bytes, .. } = w.finish(&c).unwrap();
            let n = cut % bytes.len();
            prop_assert!(parse_pack(&c, &pid, &bytes[..n]).is_err());
            prop_assert!(parse_pack(&c, &pid, &garbage).is_err());
        }
    }
}
