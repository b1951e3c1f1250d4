//! Key files (`keys/<id>`): JSON with argon2 parameters and a sealed master key.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let id = cairn_engine::id::KeyId::default();
    if let Ok(kf) = cairn_engine::keyfile::KeyFile::from_json(data, &id) {
        // Unwrapping runs argon2 with the file's cost: a fuzzer cannot wait for 4 GiB
        // derivations (their bound is unit-tested), so only cheap ones are unwrapped.
        let cheap = kf
            .kdf
            .params
            .is_none_or(|p| p.memory_kib <= 256 && p.iterations <= 2 && p.parallelism <= 4);
        if cheap {
            let _ = kf.unwrap_key(b"password");
        }
    }
});
