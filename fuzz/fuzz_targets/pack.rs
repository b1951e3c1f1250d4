//! Pack files: header, footer and trailer (unauthenticated in an unencrypted
//! repository), then every blob the trailer names.
#![no_main]
use cairn_engine::crypto::Encryption;
use cairn_engine::id::{Id, PackId};
use cairn_engine::pack;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let crypto = common::crypto(Encryption::None);
    let id = PackId(Id::hash_of(data));
    if let Ok(entries) = pack::parse_pack(&crypto, &id, data) {
        for e in &entries {
            // In bounds by construction of a parse that succeeded.
            let end = e.offset as usize + e.length as usize;
            assert!(end <= data.len());
            let _ = pack::verified_blob(&crypto, data, e);
        }
    }
    if data.len() >= pack::FOOTER_LEN {
        let footer = &data[data.len() - pack::FOOTER_LEN..];
        let _ = pack::trailer_span(&id, footer, data.len() as u64);
        let _ = pack::trailer_span(&id, footer, u64::MAX);
    }
    let _ = pack::parse_trailer(&crypto, &id, data, u64::MAX);
    let _ = pack::check_header(&id, data);
});
