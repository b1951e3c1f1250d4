//! Backing up a file from what its source knows changed: only the changed ranges are
//! read, the rest keeps the chunks of the content it started from.
//!
//! A source that records writes (a recovery session's writable layer) can say, for a
//! file, which content it started as (its `base`, the extents of a snapshot's file) and
//! which byte ranges may differ from it since. [`plan`] keeps every base chunk that no
//! changed range touches and that still lies inside the file, and turns the runs of the
//! others (and any growth past the base) into ranges to read and chunk again. A
//! re-chunked run is cut on its own, between base chunk boundaries, so the chunks after
//! it stay the base's and deduplicate: the price is that chunk boundaries drift from
//! what a full read would cut, which costs a little deduplication against other copies
//! of the same file and nothing in correctness.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use crate::tree::Extent;

/// What a source knows about how one file changed since the content `base`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDelta {
    /// The content the file started as (a snapshot file's extents).
    pub base: Vec<Extent>,
    /// Byte ranges of the current file that may differ from `base`, in any order; bytes
    /// outside them (and below the current size) are the base's.
    pub changed: Vec<Range<u64>>,
}

/// A source that knows how its files changed.
pub trait KnownChanges: Send + Sync {
    /// The delta of the regular file at `path` (as walked), of current size `size`;
    /// `None`: read it whole.
    fn delta(&self, path: &Path, size: u64) -> Option<FileDelta>;
}

/// A shared [`KnownChanges`] in backup options.
#[derive(Clone)]
pub struct Changes(pub Arc<dyn KnownChanges>);

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Changes(..)")
    }
}

/// One step of backing up a file from its delta, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// A base chunk (or hole) the changes did not touch.
    Keep(Extent),
    /// Bytes to read from the current file and chunk.
    Read(Range<u64>),
}

/// The pieces that make a file of `size` bytes from `delta`: base extents kept where no
/// changed range touches them, and the rest read, in runs as long as possible.
#[must_use]
pub fn plan(delta: &FileDelta, size: u64) -> Vec<Piece> {
    let changed = merged(&delta.changed, size);
    let mut pieces = Vec::new();
    let mut run: Option<Range<u64>> = None;
    let mut start = 0u64;
    let mut next_change = 0usize;
    for e in &delta.base {
        if start >= size {
            break;
        }
        let end = start + e.len;
        while next_change < changed.len() && changed[next_change].end <= start {
            next_change += 1;
        }
        let touched = end > size || changed.get(next_change).is_some_and(|c| c.start < end);
        if touched {
            let stop = end.min(size);
            run = Some(run.map_or(start..stop, |r| r.start..stop));
        } else {
            if let Some(r) = run.take() {
                pieces.push(Piece::Read(r));
            }
            pieces.push(Piece::Keep(*e));
        }
        start = end;
    }
    if start < size {
        run = Some(run.map_or(start..size, |r| r.start..size));
    }
    if let Some(r) = run {
        pieces.push(Piece::Read(r));
    }
    pieces
}

/// `ranges` clipped to `size`, sorted, overlapping and touching ones joined.
fn merged(ranges: &[Range<u64>], size: u64) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = ranges
        .iter()
        .map(|r| r.start.min(size)..r.end.min(size))
        .filter(|r| r.start < r.end)
        .collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::id::BlobId;
    use proptest::prelude::*;

    fn ext(len: u64, tag: u8) -> Extent {
        Extent {
            blob: Some(BlobId(crate::id::Id::hash_of(&[tag]))),
            len,
        }
    }

    #[test]
    fn a_page_rewritten_in_the_middle_reads_its_chunk_alone() {
        let base = vec![ext(100, 1), ext(100, 2), ext(100, 3)];
        let d = FileDelta {
            base: base.clone(),
            changed: vec![150..158],
        };
        assert_eq!(
            plan(&d, 300),
            vec![
                Piece::Keep(base[0]),
                Piece::Read(100..200),
                Piece::Keep(base[2])
            ]
        );
    }

    #[test]
    fn growth_and_shrinking() {
        let base = vec![ext(100, 1), ext(100, 2)];
        let grown = FileDelta {
            base: base.clone(),
            changed: vec![200..250],
        };
        assert_eq!(
            plan(&grown, 250),
            vec![
                Piece::Keep(base[0]),
                Piece::Keep(base[1]),
                Piece::Read(200..250)
            ]
        );
        let shrunk = FileDelta {
            base: base.clone(),
            changed: vec![],
        };
        assert_eq!(
            plan(&shrunk, 150),
            vec![Piece::Keep(base[0]), Piece::Read(100..150)]
        );
        assert_eq!(plan(&shrunk, 0), vec![]);
    }

    #[test]
    fn changes_at_a_boundary_and_adjacent_runs() {
        let base = vec![ext(100, 1), ext(100, 2), ext(100, 3), ext(100, 4)];
        let d = FileDelta {
            base: base.clone(),
            changed: vec![99..101, 250..260, 200..201],
        };
        assert_eq!(
            plan(&d, 400),
            vec![Piece::Read(0..300), Piece::Keep(base[3])]
        );
    }

    proptest! {
        /// The pieces cover the file exactly, in order; a kept extent is a base extent
        /// at its own offset that no change touches; reads are not adjacent.
        #[test]
        fn pieces_tile_the_file(
            lens in prop::collection::vec(1u64..50, 0..12),
            changes in prop::collection::vec((0u64..700, 0u64..40), 0..6),
            size in 0u64..700,
        ) {
            let base: Vec<Extent> = lens.iter().map(|&l| ext(l, 7)).collect();
            let offsets: Vec<u64> = lens.iter().scan(0, |o, &l| { let s = *o; *o += l; Some(s) }).collect();
            let changed: Vec<Range<u64>> = changes.iter().map(|&(s, l)| s..s + l).collect();
            let pieces = plan(&FileDelta { base, changed: changed.clone() }, size);
            let mut pos = 0u64;
            let mut last_read = false;
            for p in &pieces {
                match p {
                    Piece::Keep(e) => {
                        prop_assert!(offsets.contains(&pos));
                        prop_assert!(pos + e.len <= size);
                        prop_assert!(!changed.iter().any(|c| c.start < c.end && c.start < pos + e.len && pos < c.end));
                        pos += e.len;
                        last_read = false;
                    }
                    Piece::Read(r) => {
                        prop_assert_eq!(r.start, pos);
                        prop_assert!(r.end > r.start);
                        prop_assert!(!last_read);
                        pos = r.end;
                        last_read = true;
                    }
                }
            }
            prop_assert_eq!(pos, size);
        }
    }
}
