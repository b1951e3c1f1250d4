//! The repository's `config` file: id, format version and parameters, stored in the
//! clear (so the version can be checked before any password is asked) and authenticated
//! with a MAC under the master key (so nobody can change the parameters unnoticed).
//!
//! Layout: `magic "CAIRNCFG" (8) | body length u32 LE | body (JSON) | BLAKE3-keyed MAC (32)`,
//! the MAC taken over everything before it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::chunker::ChunkerParams;
use crate::crypto::{Crypto, Encryption};
use crate::error::{Error, Result};
use crate::id::RepoId;

/// The format version this program writes and the newest it reads. Version 2 added
/// extent-list blobs (a file's list of chunks kept out of its directory's tree); a
/// repository of version 1 is read and written as version 1 (`docs/FORMAT.md`).
pub const FORMAT_VERSION: u32 = 2;
/// The first format version with extent-list blobs (`tree::Node::content_lists`).
pub const EXTENT_LISTS_VERSION: u32 = 2;
/// The oldest format version this program can create (`repo init --format-version`), for
/// repositories that older programs must still open.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"CAIRNCFG";
const MAC_LEN: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Config {
    pub version: u32,
    pub id: RepoId,
    pub created: DateTime<Utc>,
    pub encryption: Encryption,
    pub chunker: ChunkerParams,
    /// zstd level for new blobs; 0 stores blobs uncompressed.
    pub compression_level: i32,
    /// Packs are closed once they reach this many bytes.
    pub pack_size: u32,
    /// Fixed chunk size of new block images (a power of two, 64 KiB to 16 MiB). Configs
    /// written before this field existed used 1 MiB. An image whose parent snapshot
    /// used another size keeps the parent's (see `backup::image`).
    #[serde(default = "image_chunk_size_before_field")]
    pub image_chunk_size: u32,
}

/// What image backups used before [`Config::image_chunk_size`] was recorded.
fn image_chunk_size_before_field() -> u32 {
    1 << 20
}

/// The image chunk size of new repositories: 256 KiB. Against 1 MiB, a VM disk changed in
/// place adds half as much per incremental and a random read through the mount decodes a
/// quarter as much (reads/s x1.7 against 512 KiB); the first backup stores ~1.3% more and
/// takes ~10% longer (docs/BENCHMARKS.md). Images over 256 GiB get larger chunks
/// (`backup::image::MAX_IMAGE_CHUNKS`).
pub const DEFAULT_IMAGE_CHUNK: u32 = 256 << 10;

/// Whether `size` is a valid image chunk size.
#[must_use]
pub fn valid_image_chunk(size: u64) -> bool {
    size.is_power_of_two() && (64 << 10..=16 << 20).contains(&size)
}

/// Just enough of the body to check the version before parsing the rest.
#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

impl Config {
    #[must_use]
    pub fn new(encryption: Encryption) -> Self {
        Self {
            version: FORMAT_VERSION,
            id: RepoId(crate::id::Id::random()),
            created: Utc::now(),
            encryption,
            chunker: ChunkerParams::DEFAULT,
            compression_level: 3,
            pack_size: 16 * 1024 * 1024,
            image_chunk_size: DEFAULT_IMAGE_CHUNK,
        }
    }

    pub fn encode(&self, crypto: &Crypto) -> Vec<u8> {
        let body = serde_json::to_vec_pretty(self).unwrap_or_default();
        let mut out = Vec::with_capacity(body.len() + 44);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&body);
        let mac = crypto.mac(&out);
        out.extend_from_slice(&mac);
        out
    }

    /// Parses `config` without checking its MAC (no key yet). Fails with
    /// [`Error::UnsupportedVersion`] for a newer format.
    pub fn decode_unverified(bytes: &[u8]) -> Result<Self> {
        let corrupt = |r: &str| Error::corrupt("config", r.to_owned());
        if bytes.len() < 12 + MAC_LEN || &bytes[..8] != MAGIC {
            return Err(corrupt("not a cairn config file (bad magic or too short)"));
        }
        let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        if bytes.len() != 12 + len + MAC_LEN {
            return Err(corrupt("length field does not match the file size"));
        }
        let body = &bytes[12..12 + len];
        let v: VersionOnly = serde_json::from_slice(body)
            .map_err(|e| Error::corrupt("config", format!("unreadable: {e}")))?;
        if v.version > FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                found: v.version,
                supported: FORMAT_VERSION,
            });
        }
        if v.version == 0 {
            return Err(corrupt("format version 0 does not exist"));
        }
        let cfg: Self = serde_json::from_slice(body)
            .map_err(|e| Error::corrupt("config", format!("unreadable: {e}")))?;
        cfg.chunker.validate()?;
        if cfg.pack_size < 1024 * 1024 || cfg.pack_size > 1024 * 1024 * 1024 {
            return Err(corrupt("pack size out of range"));
        }
        if !valid_image_chunk(u64::from(cfg.image_chunk_size)) {
            return Err(corrupt("image chunk size out of range"));
        }
        Ok(cfg)
    }

    /// Checks the MAC of `bytes` with the repository's key.
    pub fn verify(bytes: &[u8], crypto: &Crypto) -> Result<()> {
        let (signed, mac) = bytes.split_at(bytes.len().saturating_sub(MAC_LEN));
        if crypto.mac(signed).as_slice() != mac {
            return Err(Error::corrupt(
                "config",
                "MAC mismatch: the file was altered, or belongs to another repository",
            ));
        }
        Ok(())
    }
}
