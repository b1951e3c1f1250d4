//! Snapshot manifests (`snapshots/<id>`): one small sealed file per snapshot.
//!
//! Layout: `magic "CRNSNAP\x01"... (8) | version u32 | seal(CBOR manifest, aad "cairn.snapshot.v1")`.
//! The id is the BLAKE3 hash of the file. A snapshot exists once its manifest is durable.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::crypto::Crypto;
use crate::error::{Error, Result};
use crate::id::{BlobId, Id, SnapshotId};

const MAGIC: &[u8; 8] = b"CRNSNAP\x89";
const VERSION: u32 = 1;
const AAD: &[u8] = b"cairn.snapshot.v1";

/// What a snapshot's root holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// File trees: the root is the tree of `/` holding the backed-up paths.
    Tree,
    /// One byte stream: the root tree holds one file named after the stream.
    Stream,
    /// A block image (a VM disk): the root tree holds one file `<name>.raw` of the
    /// guest-visible size, cut in fixed, offset-aligned chunks (zero chunks are holes).
    Image,
}

/// Figures of one backup run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub files: u64,
    pub dirs: u64,
    /// Files not read again because they were unchanged since the parent.
    pub files_unchanged: u64,
    /// Logical bytes of all files (the snapshot's size).
    pub total_bytes: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    pub blobs_new: u64,
    /// Plaintext bytes of the new blobs.
    pub bytes_new: u64,
    /// Bytes the new blobs take in the repository (after compression and encryption).
    pub bytes_stored: u64,
    /// Entries that could not be read (the snapshot lacks them).
    pub errors: u64,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub time: DateTime<Utc>,
    pub host: String,
    pub user: String,
    pub kind: SnapshotKind,
    /// Backed-up paths (tree snapshots), absolute.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Name of a stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<SnapshotId>,
    pub root: BlobId,
    pub summary: Summary,
    /// Source-specific facts (database version, domain XML, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
}

impl Manifest {
    /// The manifest of a stream or image snapshot named `name`, made now by this user;
    /// parent, summary and meta are the caller's to fill in.
    #[must_use]
    pub fn named(
        kind: SnapshotKind,
        name: &str,
        host: String,
        tags: Vec<String>,
        root: BlobId,
    ) -> Self {
        Self {
            time: Utc::now(),
            host,
            user: crate::repository::current_user(),
            kind,
            paths: Vec::new(),
            name: Some(name.to_owned()),
            tags,
            parent: None,
            root,
            summary: Summary::default(),
            meta: BTreeMap::new(),
        }
    }

    /// A short label of what was backed up: the stream name or the paths.
    #[must_use]
    pub fn source_label(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => self.paths.join(" "),
        }
    }

    pub fn encode(&self, crypto: &Crypto) -> (SnapshotId, Vec<u8>) {
        let mut plain = Vec::new();
        let _ = ciborium::into_writer(self, &mut plain);
        let mut out = Vec::with_capacity(plain.len() + 40);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&crypto.seal(&plain, AAD));
        (SnapshotId(Id::hash_of(&out)), out)
    }

    pub fn decode(crypto: &Crypto, id: &SnapshotId, bytes: &[u8]) -> Result<Self> {
        let what = || format!("snapshot {id}");
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err(Error::corrupt(what(), "not a snapshot manifest"));
        }
        let v = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if v > VERSION {
            return Err(Error::UnsupportedVersion {
                found: v,
                supported: VERSION,
            });
        }
        if SnapshotId(Id::hash_of(bytes)) != *id {
            return Err(Error::corrupt(what(), "content does not match its id"));
        }
        let plain = crypto.open(&bytes[12..], AAD, &what)?;
        ciborium::from_reader(plain.as_slice())
            .map_err(|e| Error::corrupt(what(), format!("undecodable: {e}")))
    }
}

/// A snapshot id with its manifest.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub id: SnapshotId,
    pub manifest: Manifest,
}

/// Narrows a list of snapshots (for `latest` and listings).
#[derive(Debug, Clone, Default)]
pub struct SnapshotFilter {
    pub hosts: Vec<String>,
    /// A snapshot matches when it has all of these tags.
    pub tags: Vec<String>,
    /// A snapshot matches when it has all of these paths.
    pub paths: Vec<String>,
    pub name: Option<String>,
}

impl SnapshotFilter {
    #[must_use]
    pub fn matches(&self, m: &Manifest) -> bool {
        (self.hosts.is_empty() || self.hosts.contains(&m.host))
            && self.tags.iter().all(|t| m.tags.contains(t))
            && self.paths.iter().all(|p| m.paths.contains(p))
            && self
                .name
                .as_ref()
                .is_none_or(|n| m.name.as_ref() == Some(n))
    }
}

/// Finds the snapshot `spec` names among `all` (sorted by time): `latest` (the newest
/// matching `filter`) or a unique prefix of an id.
pub fn select<'a>(
    all: &'a [Snapshot],
    spec: &str,
    filter: &SnapshotFilter,
) -> Result<&'a Snapshot> {
    if spec == "latest" {
        return all
            .iter()
            .filter(|s| filter.matches(&s.manifest))
            .max_by_key(|s| s.manifest.time)
            .ok_or_else(|| Error::NotFound("no snapshot matches (for `latest`)".into()));
    }
    if spec.len() < 4 || !spec.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::InvalidInput(format!(
            "{spec:?} is not a snapshot: give `latest` or at least 4 hex digits of an id"
        )));
    }
    let spec = spec.to_ascii_lowercase();
    let mut found = all.iter().filter(|s| s.id.to_hex().starts_with(&spec));
    match (found.next(), found.next()) {
        (Some(s), None) => Ok(s),
        (None, _) => Err(Error::NotFound(format!("no snapshot with id {spec}…"))),
        (Some(_), Some(_)) => Err(Error::InvalidInput(format!(
            "snapshot id prefix {spec} is ambiguous: give more digits"
        ))),
    }
}
