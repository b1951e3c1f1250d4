//! Trees: one blob per directory, listing its entries ([`Node`]s) sorted by name.
//!
//! Encoded as CBOR (RFC 8949). Names, symlink targets and xattrs are byte strings: any
//! Unix name round-trips, including invalid UTF-8 and newlines. Decoding validates what
//! restore relies on for safety: every name is one path component (not empty, not `.`
//! or `..`, no `/` or NUL), names are strictly sorted (so unique), and each node carries
//! only the fields of its kind.
//!
//! A file of more than [`EXTENTS_INLINE`] extents keeps its extent list out of the tree,
//! in extent-list blobs of at most that many extents each (format version 2), named in
//! [`Node::content_lists`]; without that, one huge file could make its directory's tree
//! larger than a blob may be. Readers get the whole list back in [`Node::content`]
//! (`Repository::load_tree` reads the list blobs, [`Tree::fill_content`]).

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
    /// Content of a file, in order; sums to `size`. In a stored tree, empty when the
    /// list is in [`Self::content_lists`]; in a loaded tree, always the whole list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content: Vec<Extent>,
    /// The extent-list blobs holding a long [`Self::content`], in order (format 2). Kept
    /// in a loaded tree too: they are blobs the snapshot needs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content_lists: Vec<BlobId>,
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
            content_lists: Vec::new(),
            subtree: None,
            target: None,
            rdev: 0,
            xattrs: Vec::new(),
        }
    }

    /// The blobs of the file's content: its extent-list blobs, then its data blobs. With
    /// [`Self::subtree`], everything a node needs.
    pub fn content_blobs(&self) -> impl Iterator<Item = BlobId> + '_ {
        self.content_lists
            .iter()
            .copied()
            .chain(self.content.iter().filter_map(|e| e.blob))
    }

    /// Fills in [`Self::content`] from the extent-list blobs in [`Self::content_lists`]
    /// (nothing to do without them), with `read(list)` giving a list blob's bytes; `tree`
    /// names the node's tree in errors. The whole list must add up to the file's size.
    pub fn fill_content<B: std::borrow::Borrow<Vec<u8>>>(
        &mut self,
        tree: &BlobId,
        mut read: impl FnMut(&BlobId) -> Result<B>,
    ) -> Result<()> {
        if self.content_lists.is_empty() {
            return Ok(());
        }
        let name = self.display_name();
        let what = || format!("tree {tree}, file {name:?}");
        let mut content = Vec::new();
        for list in &self.content_lists {
            let bytes = read(list)?;
            let part: Vec<Extent> =
                ciborium::from_reader(bytes.borrow().as_slice()).map_err(|e| {
                    Error::corrupt(what(), format!("extent list {list} undecodable: {e}"))
                })?;
            if part.is_empty() || part.len() > EXTENTS_INLINE {
                return Err(Error::corrupt(
                    what(),
                    format!("extent list {list} holds {} extents", part.len()),
                ));
            }
            content.extend(part);
        }
        self.content = content;
        check_size(self).map_err(|r| Error::corrupt(what(), r))
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
            let inline = !n.content.is_empty();
            let in_blobs = !n.content_lists.is_empty();
            if dir != n.subtree.is_some()
                || (n.kind == NodeKind::Symlink) != n.target.is_some()
                || (!file && (inline || in_blobs))
                || (inline && in_blobs)
            {
                return Err(format!(
                    "fields do not fit a {} at {shown:?}",
                    n.kind.as_str()
                ));
            }
            // A list kept in blobs is checked once read (`fill_content`).
            if file && !in_blobs {
                check_size(n)?;
            }
        }
        Ok(())
    }

    /// Fills in [`Node::content`] of every node whose list is in extent-list blobs (see
    /// [`Node::fill_content`]).
    pub fn fill_content<B: std::borrow::Borrow<Vec<u8>>>(
        &mut self,
        id: &BlobId,
        mut read: impl FnMut(&BlobId) -> Result<B>,
    ) -> Result<()> {
        for n in &mut self.nodes {
            n.fill_content(id, &mut read)?;
        }
        Ok(())
    }

    /// Moves every extent list longer than `inline` out of the tree: `save(list)` stores
    /// one list blob's bytes (at most `inline` extents) and returns its id. Nodes keep
    /// [`Node::content`] empty and name the blobs in [`Node::content_lists`].
    pub fn move_out_long_content(
        &mut self,
        inline: usize,
        mut save: impl FnMut(&[u8]) -> Result<BlobId>,
    ) -> Result<()> {
        let inline = inline.max(1);
        for n in &mut self.nodes {
            n.content_lists.clear();
            if n.content.len() <= inline {
                continue;
            }
            for part in n.content.chunks(inline) {
                let mut bytes = Vec::new();
                // Writing CBOR to a Vec cannot fail.
                let _ = ciborium::into_writer(part, &mut bytes);
                n.content_lists.push(save(&bytes)?);
            }
            n.content = Vec::new();
        }
        Ok(())
    }
}

/// How deep directories may nest in a snapshot. Deeper is refused when backing up (the
/// directory is skipped with a warning) and when reading a snapshot (its trees are
/// corrupt): the walks recurse, and a crafted snapshot must not overflow their stack.
pub const MAX_DEPTH: usize = 1024;

/// The error for a tree nested deeper than [`MAX_DEPTH`].
#[must_use]
pub fn too_deep(tree: &BlobId) -> crate::Error {
    crate::Error::corrupt(
        format!("tree {tree}"),
        format!("directories nested more than {MAX_DEPTH} deep"),
    )
}

/// Most extents a node lists in its tree, and most an extent-list blob holds: 65536, a
/// list blob of about 3 MiB, and 32 GiB of a file at the default average chunk size.
pub const EXTENTS_INLINE: usize = 1 << 16;

fn check_size(n: &Node) -> std::result::Result<(), String> {
    let total = n
        .content
        .iter()
        .try_fold(0u64, |acc, e| acc.checked_add(e.len));
    if total == Some(n.size) {
        Ok(())
    } else {
        Err(format!(
            "content does not add up to the size at {:?}",
            n.display_name()
        ))
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

#[cfg(test)]
mod list_tests {
    use std::collections::HashMap;

    use super::*;

    fn file(n: u64) -> Node {
        Node {
            size: n * 10,
            content: (0..n)
                .map(|i| Extent {
                    blob: Some(BlobId(crate::id::Id::from_bytes([i as u8; 32]))),
                    len: 10,
                })
                .collect(),
            ..Node::new(format!("f{n}").into_bytes(), NodeKind::File)
        }
    }

    /// Moves the lists of `tree` out (at most `inline` extents inline) into a map.
    fn moved(tree: &Tree, inline: usize) -> (Tree, HashMap<BlobId, Vec<u8>>) {
        let mut store = HashMap::new();
        let mut t = tree.clone();
        t.move_out_long_content(inline, |b| {
            let id = BlobId(crate::id::Id::from_bytes(*blake3::hash(b).as_bytes()));
            store.insert(id, b.to_vec());
            Ok(id)
        })
        .unwrap();
        (t, store)
    }

    #[test]
    fn lists_move_out_and_come_back_whole() {
        let tree = Tree {
            nodes: vec![file(2), file(3), file(7)],
        };
        let (stored, store) = moved(&tree, 3);
        // Only the list longer than 3 moved, into ceil(7 / 3) blobs.
        let lists: Vec<usize> = stored.nodes.iter().map(|n| n.content_lists.len()).collect();
        assert_eq!(lists, [0, 0, 3]);
        assert!(stored.nodes[2].content.is_empty());
        let id = BlobId::default();
        let mut back = Tree::decode(&stored.encode(), &id).unwrap();
        back.fill_content(&id, |b| Ok(store[b].clone())).unwrap();
        for (a, b) in back.nodes.iter().zip(&tree.nodes) {
            assert_eq!(a.content, b.content);
        }
        assert_eq!(back.nodes[2].content_blobs().count(), 3 + 7);
    }

    #[test]
    fn bad_lists_are_refused() {
        let id = BlobId::default();
        let tree = Tree {
            nodes: vec![file(7)],
        };
        let (stored, store) = moved(&tree, 3);
        // A node with both an inline list and list blobs.
        let mut both = stored.clone();
        both.nodes[0].content = tree.nodes[0].content.clone();
        assert!(Tree::decode(&both.encode(), &id).is_err());
        // List blobs on a directory.
        let mut dir = stored.clone();
        dir.nodes[0].kind = NodeKind::Dir;
        dir.nodes[0].subtree = Some(id);
        dir.nodes[0].size = 0;
        assert!(Tree::decode(&dir.encode(), &id).is_err());
        // Lists that do not add up to the size, a list blob that is not a list, and an
        // empty list.
        let fill = |t: &Tree, read: &dyn Fn(&BlobId) -> Vec<u8>| {
            let mut t = Tree::decode(&t.encode(), &id).unwrap();
            t.fill_content(&id, |b| Ok(read(b)))
        };
        let mut short = stored.clone();
        short.nodes[0].content_lists.pop();
        let err = fill(&short, &|b| store[b].clone()).unwrap_err();
        assert!(err.to_string().contains("add up"), "{err}");
        assert!(fill(&stored, &|_| b"\xff\xff".to_vec()).is_err());
        let mut empty = Vec::new();
        ciborium::into_writer(&Vec::<Extent>::new(), &mut empty).unwrap();
        assert!(fill(&stored, &|_| empty.clone()).is_err());
        // A read error is passed on.
        let mut t = Tree::decode(&stored.encode(), &id).unwrap();
        assert!(t
            .fill_content(&id, |_| Err::<Vec<u8>, _>(Error::corrupt("x", "gone")))
            .is_err());
    }
}
