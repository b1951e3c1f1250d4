//! Lock files (`locks/<id>`): JSON anyone who can write the repository may put there.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = serde_json::from_slice::<cairn_engine::lock::LockInfo>(data) {
        let _ = cairn_engine::lock::staleness(&info, chrono::Utc::now());
        let entry = cairn_engine::lock::LockEntry {
            name: "x".into(),
            info: Ok(info),
            stale: None,
        };
        let _ = entry.describe();
        let _ = cairn_engine::lock::uncommitted_windows(&[entry], None);
    }
});
