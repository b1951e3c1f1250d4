//! Content-defined chunking (FastCDC, 2020 variant) of files and streams.
//!
//! The parameters live in the repository's `config` so every host cuts the same data at
//! the same places. Block images use fixed, offset-aligned chunks instead (not here).

use std::io::Read;

use fastcdc::v2020::StreamCDC;
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
    /// min 256 KiB, average 1 MiB, max 4 MiB.
    pub const DEFAULT: Self = Self {
        min_size: 256 * 1024,
        avg_size: 1024 * 1024,
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

/// Cuts a reader into chunks. Yields owned chunk data; memory is bounded by `max_size`
/// plus FastCDC's read buffer.
pub struct Chunker<R: Read> {
    inner: StreamCDC<R>,
}

impl<R: Read> Chunker<R> {
    pub fn new(reader: R, p: ChunkerParams) -> Self {
        Self {
            inner: StreamCDC::new(reader, p.min_size, p.avg_size, p.max_size),
        }
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next().map(|r| {
            r.map(|c| c.data).map_err(|e| match e {
                fastcdc::v2020::Error::IoError(io) => io,
                other => std::io::Error::other(other.to_string()),
            })
        })
    }
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

    fn chunks(data: &[u8], p: ChunkerParams) -> Vec<Vec<u8>> {
        Chunker::new(data, p).map(|c| c.unwrap()).collect()
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
