//! How chunking parameters trade deduplication against compression, on real data.
//!
//! `cargo run --release -p cairn-bench-micro --example dedup_params -- V1 V2 MODE [LEVEL]`
//!
//! V1 and V2 are two versions of one file (a disk image, a dump). MODE is `cdc:MIN:AVG:MAX`
//! (KiB; content-defined, over the file's data extents as a file backup reads them) or
//! `fixed:SIZE` (KiB; offset-aligned chunks as an image backup cuts them, all-zero chunks
//! as holes). Prints, for zstd at LEVEL (default 3): the stored bytes of V1's distinct
//! chunks, what V2 adds, and chunk counts. Compression per chunk is what the repository
//! stores (before the 29 bytes of sealing per blob and the packs' trailers).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;

use cairn_engine::chunker::{cut, ChunkerParams};

enum Mode {
    Cdc(ChunkerParams),
    Fixed(usize),
}

/// The data extents of a file, by SEEK_DATA/SEEK_HOLE, as the file backup reads them.
fn extents(f: &File, size: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    let size = i64::try_from(size).expect("size");
    while pos < size {
        let Ok(start) = nix::unistd::lseek(fd, pos, nix::unistd::Whence::SeekData) else {
            break;
        };
        let end = nix::unistd::lseek(fd, start, nix::unistd::Whence::SeekHole).unwrap_or(size);
        out.push((start as u64, end as u64));
        pos = end;
    }
    out
}

/// The chunks of one file: (hash, length, is zeros).
fn chunks(path: &str, mode: &Mode) -> Vec<(blake3::Hash, Vec<u8>)> {
    let mut f = File::open(path).expect("open");
    let size = f.metadata().expect("stat").len();
    let mut out = Vec::new();
    match mode {
        Mode::Cdc(p) => {
            for (a, b) in extents(&f, size) {
                f.seek(SeekFrom::Start(a)).expect("seek");
                let mut data = vec![0u8; usize::try_from(b - a).expect("len")];
                f.read_exact(&mut data).expect("read");
                let mut start = 0;
                for end in cut(&data, *p, true) {
                    let c = data[start..end].to_vec();
                    out.push((blake3::hash(&c), c));
                    start = end;
                }
            }
        }
        Mode::Fixed(size_each) => {
            let mut buf = vec![0u8; *size_each];
            loop {
                let mut got = 0;
                while got < buf.len() {
                    let n = f.read(&mut buf[got..]).expect("read");
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                if got == 0 {
                    break;
                }
                let c = &buf[..got];
                if c.iter().any(|&b| b != 0) {
                    out.push((blake3::hash(c), c.to_vec()));
                }
                if got < buf.len() {
                    break;
                }
            }
        }
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: dedup_params V1 V2 cdc:MIN:AVG:MAX|fixed:SIZE (KiB) [LEVEL]");
        std::process::exit(2);
    }
    let kib = |s: &str| s.parse::<u32>().expect("a number of KiB") * 1024;
    let parts: Vec<&str> = args[3].split(':').collect();
    let mode = match parts.as_slice() {
        ["cdc", a, b, c] => Mode::Cdc(ChunkerParams {
            min_size: kib(a),
            avg_size: kib(b),
            max_size: kib(c),
        }),
        ["fixed", s] => Mode::Fixed(kib(s) as usize),
        _ => panic!("bad mode {}", args[3]),
    };
    let level: i32 = args.get(4).map_or(3, |l| l.parse().expect("level"));
    let mut stored: HashMap<blake3::Hash, usize> = HashMap::new();
    for (i, path) in args[1..3].iter().enumerate() {
        let cs = chunks(path, &mode);
        let total = cs.len();
        let new: Vec<(blake3::Hash, Vec<u8>)> = {
            let mut seen = std::collections::HashSet::new();
            cs.into_iter()
                .filter(|(h, _)| !stored.contains_key(h) && seen.insert(*h))
                .collect()
        };
        let sizes: Vec<(blake3::Hash, usize, usize)> = std::thread::scope(|s| {
            let half = new.len() / 2;
            let (a, b) = new.split_at(half);
            let work = |part: &[(blake3::Hash, Vec<u8>)]| -> Vec<(blake3::Hash, usize, usize)> {
                part.iter()
                    .map(|(h, c)| {
                        let z = zstd::bulk::compress(c, level).expect("zstd").len();
                        // Stored raw when compression saves less than 1/64, as the engine does.
                        let z = if z + z / 64 < c.len() { z } else { c.len() };
                        (*h, c.len(), z)
                    })
                    .collect()
            };
            let ja = s.spawn(move || work(a));
            let mut rb = work(b);
            let mut ra = ja.join().expect("thread");
            ra.append(&mut rb);
            ra
        });
        let raw: usize = sizes.iter().map(|s| s.1).sum();
        let z: usize = sizes.iter().map(|s| s.2).sum();
        for (h, _, zl) in &sizes {
            stored.insert(*h, *zl);
        }
        println!(
            "v{}: {total} chunks, {} new, new raw {:.1} MiB, new stored {:.1} MiB",
            i + 1,
            sizes.len(),
            raw as f64 / 1048576.0,
            z as f64 / 1048576.0
        );
    }
    let all: usize = stored.values().sum();
    println!(
        "total stored {:.1} MiB in {} blobs",
        all as f64 / 1048576.0,
        stored.len()
    );
}
