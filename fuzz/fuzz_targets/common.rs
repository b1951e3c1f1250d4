//! What the targets share: keys fixed for the run (an unencrypted repository's are
//! known to whoever can read its key file, so its bytes are the attacker's to choose).

use cairn_engine::crypto::{Crypto, Encryption, MasterKey};

/// The same keys in every run, so that a crash reproduces.
pub fn master_key() -> MasterKey {
    let bytes: Vec<u8> = (0..MasterKey::LEN as u8).map(|i| i.wrapping_mul(31) ^ 0x5c).collect();
    MasterKey::from_bytes(&bytes).expect("96 bytes")
}

pub fn crypto(encryption: Encryption) -> Crypto {
    Crypto::new(master_key(), encryption)
}
