//! What a writable layer tells a backup about one of its files: where the file came
//! from in the snapshot and which byte ranges may differ from there. A commit learns it
//! through the mount from the daemon, which holds the truth, synced or not yet: the
//! daemon answers a hidden extended attribute ([`CHANGES_XATTR`], never listed, so no
//! backup records it) with [`FileChanges::encode`]'s text.
//!
//! ```text
//! cairn-layer-changes 1
//! origin 626173652f31
//! changed 0-65536 1048576-1114112
//! ```
//!
//! `origin` is the hex of the file's path in the snapshot, relative to the layer's root;
//! `changed` the ranges (start inclusive, end exclusive) whose bytes may not be the
//! origin's. A file that did not come from the snapshot (or was truncated to nothing)
//! has no such attribute: read it whole.

use std::io;
use std::ops::Range;
use std::path::Path;

/// The attribute's name.
pub const CHANGES_XATTR: &str = "user.cairn.layer-changes";

const HEADER: &str = "cairn-layer-changes 1";

/// A layer file's changes against its origin in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChanges {
    /// Its path in the snapshot, relative to the layer's root.
    pub origin: Vec<u8>,
    /// Byte ranges that may differ from the origin's, sorted, not overlapping.
    pub changed: Vec<Range<u64>>,
}

impl FileChanges {
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let ranges: Vec<String> = self
            .changed
            .iter()
            .map(|r| format!("{}-{}", r.start, r.end))
            .collect();
        format!(
            "{HEADER}\norigin {}\nchanged {}\n",
            hex::encode(&self.origin),
            ranges.join(" ")
        )
        .into_bytes()
    }

    /// Parses [`encode`](Self::encode)'s text; anything else is an error saying what.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(format!("not {HEADER:?}"));
        }
        let field = |line: Option<&str>, name: &str| -> Result<String, String> {
            line.and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(' ').or((l.is_empty()).then_some(l)))
                .map(str::to_owned)
                .ok_or_else(|| format!("no {name} line"))
        };
        let origin =
            hex::decode(field(lines.next(), "origin")?).map_err(|e| format!("origin: {e}"))?;
        let changed = field(lines.next(), "changed")?
            .split_ascii_whitespace()
            .map(|r| {
                let (a, b) = r.split_once('-').ok_or_else(|| format!("range {r:?}"))?;
                let (a, b) = (a.parse::<u64>(), b.parse::<u64>());
                match (a, b) {
                    (Ok(a), Ok(b)) if a <= b => Ok(a..b),
                    _ => Err(format!("range {r:?}")),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { origin, changed })
    }
}

/// Asks the layer mounted above `path` how the file there changed. `Ok(None)`: the
/// file is not a layer's file from the snapshot (read it whole).
pub fn read(path: &Path) -> io::Result<Option<FileChanges>> {
    match xattr::get(path, CHANGES_XATTR)? {
        None => Ok(None),
        Some(v) => FileChanges::decode(&v).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: layer changes: {e}", path.display()),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let c = FileChanges {
            origin: b"base/1/2".to_vec(),
            changed: vec![0..10, 65536..131072],
        };
        assert_eq!(FileChanges::decode(&c.encode()), Ok(c));
        let none = FileChanges {
            origin: vec![],
            changed: vec![],
        };
        assert_eq!(FileChanges::decode(&none.encode()), Ok(none));
        for bad in [
            &b""[..],
            b"cairn-layer-changes 2\norigin 00\nchanged \n",
            b"cairn-layer-changes 1\norigin zz\nchanged \n",
            b"cairn-layer-changes 1\norigin 00\nchanged 5-3\n",
            b"cairn-layer-changes 1\norigin 00\nchanged 5\n",
            b"cairn-layer-changes 1\norigin 00\n",
        ] {
            assert!(FileChanges::decode(bad).is_err(), "{bad:?}");
        }
    }
}
