//! `config`: parsed before any key is known, so from anyone.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = cairn_engine::config::Config::decode_unverified(data) {
        let crypto = common::crypto(config.encryption);
        let _ = cairn_engine::config::Config::verify(data, &crypto);
        let _ = config.chunker.validate();
    }
});
