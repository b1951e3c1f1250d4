//! Micro-benchmarks of each stage of cairn's data path, one core each:
//! chunking (FastCDC with the repository defaults), hashing (keyed BLAKE3 blob ids),
//! compress+encrypt (zstd 3 + AES-256-GCM, on text and on random data), pack writing
//! (16 MiB of stored blobs into a sealed pack), and index lookups (SQLite, 200k blobs,
//! hits and misses). Run: `cargo bench -p cairn-bench-micro` (results under
//! target/criterion/); the figures are summarised in docs/BENCHMARKS.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use cairn_bench_micro::{random_bytes, text_bytes};
use cairn_engine::blob::{self, BlobKind};
use cairn_engine::chunker::{self, ChunkerParams};
use cairn_engine::crypto::{Crypto, Encryption, MasterKey};
use cairn_engine::id::{BlobId, Id, PackId};
use cairn_engine::index::Index;
use cairn_engine::pack::{PackEntry, PackWriter};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const MIB: usize = 1 << 20;

fn crypto() -> Crypto {
    Crypto::new(MasterKey::generate(), Encryption::Aes256Gcm)
}

fn chunking(c: &mut Criterion) {
    let data = random_bytes(1, 64 * MIB);
    let mut g = c.benchmark_group("chunker");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("fastcdc 256K/1M/4M, 64 MiB", |b| {
        b.iter(|| black_box(chunker::cut(&data, ChunkerParams::DEFAULT, true)));
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let crypto = crypto();
    let chunk = random_bytes(2, MIB);
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Bytes(chunk.len() as u64));
    g.bench_function("keyed blake3 blob id, 1 MiB", |b| {
        b.iter(|| black_box(crypto.blob_id(&chunk)));
    });
    g.finish();
}

fn compress_encrypt(c: &mut Criterion) {
    let crypto = crypto();
    let mut g = c.benchmark_group("compress+encrypt");
    for (name, data) in [
        ("text", text_bytes(3, MIB)),
        ("random", random_bytes(3, MIB)),
    ] {
        let id = crypto.blob_id(&data);
        g.throughput(Throughput::Bytes(data.len() as u64));
        // As a backup encodes: into a buffer the thread reuses.
        let mut buf = Vec::new();
        g.bench_function(format!("zstd 3 + aes-256-gcm, 1 MiB {name}"), |b| {
            b.iter(|| {
                black_box(blob::encode_into(
                    &crypto,
                    BlobKind::Data,
                    &id,
                    &data,
                    3,
                    &mut buf,
                ))
            });
        });
        let stored = blob::encode(&crypto, BlobKind::Data, &id, &data, 3);
        g.bench_function(
            format!("decrypt + decompress + verify, 1 MiB {name}"),
            |b| {
                b.iter_batched(
                    || stored.clone(),
                    |s| {
                        black_box(
                            blob::decode(
                                &crypto,
                                BlobKind::Data,
                                &id,
                                s,
                                data.len(),
                                blob::Verify::Hash,
                            )
                            .unwrap(),
                        )
                    },
                    BatchSize::LargeInput,
                );
            },
        );
    }
    g.finish();
}

fn pack_write(c: &mut Criterion) {
    let crypto = crypto();
    let blobs: Vec<(BlobId, Vec<u8>)> = (0..16)
        .map(|i| {
            let d = random_bytes(10 + i, MIB);
            let id = crypto.blob_id(&d);
            (id, blob::encode(&crypto, BlobKind::Data, &id, &d, 0))
        })
        .collect();
    let mut g = c.benchmark_group("pack");
    g.throughput(Throughput::Bytes(16 * MIB as u64));
    g.sample_size(20);
    g.bench_function("assemble + seal trailer + hash, 16 x 1 MiB", |b| {
        b.iter(|| {
            let mut w = PackWriter::new(Vec::with_capacity(17 * MIB)).unwrap();
            for (id, s) in &blobs {
                w.add(*id, BlobKind::Data, s, MIB).unwrap();
            }
            black_box(w.finish(&crypto).unwrap().id)
        });
    });
    let dir = tempfile::tempdir().unwrap();
    let backend = cairn_engine::store::LocalBackend::new(dir.path().join("r"));
    cairn_engine::store::Backend::create_layout(&backend).unwrap();
    g.bench_function(
        "... streamed to a file, made durable (fsync, rename)",
        |b| {
            use cairn_engine::store::{Backend, FileKind};
            b.iter(|| {
                let file = backend.create(FileKind::Pack).unwrap();
                let mut w = PackWriter::new(file).unwrap();
                for (id, s) in &blobs {
                    w.add(*id, BlobKind::Data, s, MIB).unwrap();
                }
                let done = w.finish(&crypto).unwrap();
                done.out.commit(&done.id.to_hex()).unwrap();
            });
        },
    );
    g.finish();
}

fn index_lookup(c: &mut Criterion) {
    const BLOBS: u64 = 200_000;
    let dir = tempfile::tempdir().unwrap();
    let index = Index::open(&dir.path().join("index.sqlite")).unwrap();
    let id_of = |i: u64| BlobId(Id::hash_of(&i.to_le_bytes()));
    for p in 0..BLOBS / 1000 {
        let entries: Vec<PackEntry> = (0..1000)
            .map(|j| PackEntry {
                id: id_of(p * 1000 + j),
                kind: BlobKind::Data,
                offset: 12 + j * 1000,
                length: 1000,
                raw_length: 1000,
            })
            .collect();
        index
            .add_pack(&PackId(Id::hash_of(&p.to_le_bytes())), 1_000_000, &entries)
            .unwrap();
    }
    let mut g = c.benchmark_group("index (200k blobs)");
    g.throughput(Throughput::Elements(1));
    let mut i = 0u64;
    g.bench_function("lookup, hit", |b| {
        b.iter(|| {
            i = (i + 7919) % BLOBS;
            black_box(index.lookup(&id_of(i)).unwrap().unwrap())
        });
    });
    g.bench_function("contains, miss (the dedup check of new data)", |b| {
        b.iter(|| {
            i += 1;
            black_box(index.contains(&id_of(BLOBS + i)).unwrap())
        });
    });
    g.finish();
}

criterion_group!(
    benches,
    chunking,
    hashing,
    compress_encrypt,
    pack_write,
    index_lookup
);
criterion_main!(benches);
