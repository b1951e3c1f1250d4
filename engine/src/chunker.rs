//! Content-defined chunking (FastCDC, 2020 variant) of files and streams.
//!
//! The parameters live in the repository's `config` so every host cuts the same data at
//! the same places. Block images use fixed, offset-aligned chunks instead (not here).

use fastcdc::v2020::{FastCDC, Normalization};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Chunk size bounds in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl ChunkerParams {
    /// min 256 KiB, average 512 KiB, max 4 MiB: the parameters of new repositories
    /// (existing ones keep those in their config). Against an average of 1 MiB, a
    /// re-imaged 4 GiB VM disk's second version adds 20% less and a /usr tree stores no
    /// more (docs/BENCHMARKS.md, `benches/micro/examples/dedup_params.rs`).
    pub const DEFAULT: Self = Self {
        min_size: 256 * 1024,
        avg_size: 512 * 1024,
        max_size: 4 * 1024 * 1024,
    };

    /// Checks the bounds FastCDC accepts (and that are sane for packs).
    pub fn validate(&self) -> Result<()> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&self.min_size)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&self.avg_size)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&self.max_size)
            && self.min_size <= self.avg_size
            && self.avg_size <= self.max_size;
        if ok {
            Ok(())
        } else {
            Err(Error::corrupt(
                "config",
                format!("invalid chunker parameters {self:?}"),
            ))
        }
    }
}

/// Cuts `buf` into chunks; returns their end offsets. When more data follows (`!eof`),
/// a chunk is cut only where at least `max_size` bytes follow its start, so the cut is
/// the one FastCDC makes over the whole stream; the rest (from the last end offset on)
/// must be carried into the next buffer.
#[must_use]
pub fn cut(buf: &[u8], p: ChunkerParams, eof: bool) -> Vec<usize> {
    let max = p.max_size as usize;
    let cdc = FastCDC::with_level(
        buf,
        p.min_size,
        p.avg_size,
        p.max_size,
        Normalization::Level1,
    );
    let mut ends = Vec::new();
    for c in cdc {
        if !eof && buf.len() - c.offset < max {
            break;
        }
        ends.push(c.offset + c.length);
    }
    ends
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SMALL: ChunkerParams = ChunkerParams {
        min_size: 1024,
        avg_size: 4096,
        max_size: 16384,
    };

    /// Chunks `data` through buffers of `step` bytes, as the backup does.
    fn chunks_buffered(data: &[u8], p: ChunkerParams, step: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut end = 0;
        loop {
            end = (end + step).min(data.len());
            let eof = end == data.len();
            let buf = &data[start..end];
            let mut last = 0;
            for e in cut(buf, p, eof) {
                out.push(buf[last..e].to_vec());
                last = e;
            }
            start += last;
            if eof {
                return out;
            }
        }
    }

    fn chunks(data: &[u8], p: ChunkerParams) -> Vec<Vec<u8>> {
        chunks_buffered(data, p, data.len().max(1))
    }

    fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn boundaries_are_stable() {
        // A change of chunker (crate version, parameters) changes these boundaries and
        // breaks dedup against existing repositories: this test must then fail.
        let data = pseudo_random(42, 200_000);
        let lens: Vec<usize> = chunks(&data, SMALL).iter().map(Vec::len).collect();
        assert_eq!(lens.iter().sum::<usize>(), data.len());
        let expected: Vec<usize> = include!("chunker_boundaries.txt");
        assert_eq!(lens, expected);
    }

    #[test]
    fn default_params_are_valid() {
        ChunkerParams::DEFAULT.validate().unwrap();
        assert!(ChunkerParams {
            min_size: 1,
            avg_size: 2,
            max_size: 3
        }
        .validate()
        .is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn chunks_reassemble_and_respect_bounds(seed in any::<u64>(), len in 0usize..100_000) {
            let data = pseudo_random(seed, len);
            let cs = chunks(&data, SMALL);
            prop_assert_eq!(cs.concat(), data);
            for (i, c) in cs.iter().enumerate() {
                prop_assert!(c.len() <= SMALL.max_size as usize);
                if i + 1 < cs.len() {
                    prop_assert!(c.len() >= SMALL.min_size as usize);
                }
            }
        }

        #[test]
        fn buffering_does_not_move_boundaries(seed in any::<u64>(), len in 0usize..100_000, step in 16384usize..50_000) {
            let data = pseudo_random(seed, len);
            prop_assert_eq!(chunks_buffered(&data, SMALL, step), chunks(&data, SMALL));
        }

        #[test]
        fn an_insertion_moves_few_boundaries(seed in any::<u64>(), at in 0usize..60_000) {
            let data = pseudo_random(seed, 120_000);
            let mut changed = data.clone();
            changed.insert(at, 0xAB);
            let a: std::collections::HashSet<Vec<u8>> = chunks(&data, SMALL).into_iter().collect();
            let b = chunks(&changed, SMALL);
            let new_bytes: usize = b.iter().filter(|c| !a.contains(*c)).map(Vec::len).sum();
            // Only the chunks around the insertion differ.
            prop_assert!(new_bytes <= 3 * SMALL.max_size as usize, "{} new bytes", new_bytes);
        }
    }
}
