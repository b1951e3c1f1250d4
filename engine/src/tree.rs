//! Trees: one blob per directory, listing its entries ([`Node`]s) sorted by name.
//!
//! Encoded as CBOR (RFC 8949). Names, symlink targets and xattrs are byte strings: any
//! Unix name round-trips, including invalid UTF-8 and newlines. Decoding validates what
//! restore relies on for safety: every name is one path component (not empty, not `.`
//! or `..`, no `/` or NUL), names are strictly sorted (so unique), and each node carries
//! only the fields of its kind.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::BlobId;

/// Kind of filesystem object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    Chardev,
    Blockdev,
}

impl NodeKind {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Dir => "dir",
            Self::Symlink => "symlink",
            Self::Fifo => "fifo",
            Self::Socket => "socket",
            Self::Chardev => "chardev",
            Self::Blockdev => "blockdev",
        }
    }
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

/// A run of a file's bytes: a blob of `len` bytes, or a hole of `len` zero bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<BlobId>,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// One directory entry with its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    pub kind: NodeKind,
    /// Permission bits and setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub inode: u64,
    pub device: u64,
    pub links: u64,
    /// Logical size in bytes (files).
    pub size: u64,
    /// Content of a file, in order; sums to `size`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content: Vec<Extent>,
    /// The directory's tree blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtree: Option<BlobId>,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_bytes")]
    pub target: Option<Vec<u8>>,
    /// Device number of character and block devices.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rdev: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<Xattr>,
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(v: &u64) -> bool {
    *v == 0
}

mod opt_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    #[allow(clippy::ref_option)]
    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_bytes(b),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<serde_bytes::ByteBuf>::deserialize(d)?.map(serde_bytes::ByteBuf::into_vec))
    }
}

impl Node {
    /// A node of `kind` with every other field empty or zero, for callers to fill in.
    #[must_use]
    pub fn new(name: Vec<u8>, kind: NodeKind) -> Self {
        Self {
            name,
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            user: None,
            group: None,
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            inode: 0,
            device: 0,
            links: 1,
            size: 0,
            content: Vec::new(),
            subtree: None,
            target: None,
            rdev: 0,
            xattrs: Vec::new(),
        }
    }

    /// The node's name for messages (lossy UTF-8).
    #[must_use]
    pub fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// A directory listing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

/// Whether `name` is a single, safe path component.
#[must_use]
pub fn is_valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

impl Tree {
    /// Sorts nodes by name (the order the format requires).
    pub fn sort(&mut self) {
        self.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    }

    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing CBOR to a Vec cannot fail.
        let _ = ciborium::into_writer(self, &mut out);
        out
    }

    /// Decodes and validates a tree blob; `id` names it in errors.
    pub fn decode(bytes: &[u8], id: &BlobId) -> Result<Self> {
        let what = || format!("tree {id}");
        let t: Self = ciborium::from_reader(bytes)
            .map_err(|e| Error::corrupt(what(), format!("undecodable: {e}")))?;
        t.validate().map_err(|r| Error::corrupt(what(), r))?;
        Ok(t)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let mut prev: Option<&[u8]> = None;
        for n in &self.nodes {
            let shown = n.display_name();
            if !is_valid_name(&n.name) {
                return Err(format!("invalid entry name {shown:?}"));
            }
            if prev.is_some_and(|p| p >= n.name.as_slice()) {
                return Err(format!("entries not sorted or duplicated at {shown:?}"));
            }
            prev = Some(&n.name);
            let dir = n.kind == NodeKind::Dir;
            let file = n.kind == NodeKind::File;
            if dir != n.subtree.is_some()
                || (n.kind == NodeKind::Symlink) != n.target.is_some()
                || (!file && !n.content.is_empty())
            {
                return Err(format!(
                    "fields do not fit a {} at {shown:?}",
                    n.kind.as_str()
                ));
            }
            if file {
                let total = n
                    .content
                    .iter()
                    .try_fold(0u64, |acc, e| acc.checked_add(e.len));
                if total != Some(n.size) {
                    return Err(format!("content does not add up to the size at {shown:?}"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &[u8]) -> Node {
        Node {
            mode: 0o644,
            inode: 1,
            device: 1,
            ..Node::new(name.to_vec(), NodeKind::File)
        }
    }

    #[test]
    fn round_trip_odd_names() {
        let mut t = Tree {
            nodes: vec![node(b"a\nb"), node(b"\xff\xfe"), node(b"z")],
        };
        t.sort();
        let id = BlobId::default();
        assert_eq!(Tree::decode(&t.encode(), &id).unwrap(), t);
    }

    #[test]
    fn hostile_names_are_refused() {
        let id = BlobId::default();
        for bad in [&b".."[..], b".", b"a/b", b"", b"a\0"] {
            let t = Tree {
                nodes: vec![node(bad)],
            };
            assert!(Tree::decode(&t.encode(), &id).is_err(), "{bad:?}");
        }
        let dup = Tree {
            nodes: vec![node(b"a"), node(b"a")],
        };
        assert!(Tree::decode(&dup.encode(), &id).is_err());
        let mut d = node(b"d");
        d.kind = NodeKind::Dir; // a dir without subtree
        assert!(Tree::decode(&Tree { nodes: vec![d] }.encode(), &id).is_err());
        assert!(Tree::decode(b"\xff\x00garbage", &id).is_err());
    }
}
