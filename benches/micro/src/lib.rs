//! Inputs shared by the micro-benchmarks in `benches/` (the library itself is empty of
//! logic): deterministic test data that looks like what cairn backs up.

/// Pseudo-random bytes (xorshift): incompressible, like media or encrypted files.
#[must_use]
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Text-like bytes that zstd compresses about 3:1, like source trees and logs: words drawn
/// from a small vocabulary with a skewed distribution.
#[must_use]
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "the ",
        "backup ",
        "of ",
        "a ",
        "repository ",
        "chunk ",
        "pack ",
        "index ",
        "0x1f ",
        "snapshot ",
        "restore\n",
        "mount ",
        "blob ",
        "tree ",
        "{ ",
        "} ",
    ];
    let mut out = Vec::with_capacity(len + 16);
    let noise = random_bytes(seed, len / 4 + 8);
    let mut i = 0;
    while out.len() < len {
        let r = noise[i % noise.len()];
        i += 1;
        if r < 16 {
            out.push(b'a' + r);
        } else {
            out.extend_from_slice(WORDS[usize::from(r) % WORDS.len()].as_bytes());
        }
    }
    out.truncate(len);
    out
}
