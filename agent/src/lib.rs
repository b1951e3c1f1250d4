//! # cairn-agent: what runs on a host
//!
//! Sources that need a subprocess or a remote peer, feeding the engine:
//! - [`nbd`]: an NBD client (the peer's bytes are untrusted).
//! - [`qemu`]: qemu-img (format detection, conversion) and qemu-nbd (read-only exports).
//! - [`image`]: disk images (qcow2, raw, VMDK) and NBD exports as a
//!   [`cairn_engine::backup::BlockSource`].

pub mod image;
pub mod nbd;
pub mod qemu;
