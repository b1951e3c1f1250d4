//! Damage marks (`damage/<snapshot>`): sealed JSON.
#![no_main]
use cairn_engine::crypto::Encryption;
use cairn_engine::id::SnapshotId;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let crypto = common::crypto(Encryption::None);
    let _ = cairn_engine::damage::decode(&crypto, &SnapshotId::default(), data);
});
