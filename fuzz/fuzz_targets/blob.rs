//! Blob decoding: the payload (flag, zstd frame or plain bytes) of an unencrypted
//! repository is anyone's; an encrypted one's is sealed first, as a key holder would.
#![no_main]
use cairn_engine::blob::{self, BlobKind, Verify};
use cairn_engine::crypto::Encryption;
use cairn_engine::id::{BlobId, Id};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let kind = if data[0] & 1 == 0 { BlobKind::Data } else { BlobKind::Tree };
    let encrypted = data[0] & 2 != 0;
    // The length the index claims, within what the format allows and a fuzzer affords.
    let raw_len = (u32::from_le_bytes([data[1], data[2], data[3], data[4]]) as usize) % (4 << 20);
    let payload = &data[5..];
    let crypto = common::crypto(if encrypted { Encryption::Aes256Gcm } else { Encryption::None });
    let id = BlobId(Id::from_bytes(*blake3::hash(payload).as_bytes()));
    let stored = if encrypted {
        crypto.seal(payload, b"not the blob aad")
    } else {
        payload.to_vec()
    };
    for verify in [Verify::Hash, Verify::Seal] {
        if let Ok(plain) = blob::decode(&crypto, kind, &id, stored.clone(), raw_len, verify) {
            // A blob that decodes under Hash is the one its id names.
            if verify == Verify::Hash {
                assert_eq!(crypto.blob_id(&plain), id);
            }
        }
    }
    // The id the content really has: the round trip must hold.
    let real = crypto.blob_id(payload);
    let encoded = blob::encode(&crypto, kind, &real, payload, 1);
    let back = blob::decode(&crypto, kind, &real, encoded, payload.len(), Verify::Hash)
        .expect("what we encode decodes");
    assert_eq!(back, payload);
});
