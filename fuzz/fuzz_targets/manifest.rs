//! Snapshot manifests: magic, version, content hash (the id), then sealed CBOR.
#![no_main]
use cairn_engine::crypto::Encryption;
use cairn_engine::id::{Id, SnapshotId};
use cairn_engine::snapshot::Manifest;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let crypto = common::crypto(Encryption::None);
    let id = SnapshotId(Id::hash_of(data));
    if let Ok(m) = Manifest::decode(&crypto, &id, data) {
        let (id2, bytes) = m.encode(&crypto);
        let back = Manifest::decode(&crypto, &id2, &bytes).expect("re-encoded manifest decodes");
        assert_eq!(back, m);
        let _ = m.source_label();
    }
    let _ = Manifest::decode(&crypto, &SnapshotId::default(), data);
});
