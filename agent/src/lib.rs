//! # cairn-agent: what runs on a host
//!
//! Sources that need a subprocess or a remote peer, feeding the engine:
//! - [`nbd`]: an NBD client (the peer's bytes are untrusted).
//! - [`qemu`]: qemu-img (format detection, conversion) and qemu-nbd (read-only exports).
//! - [`image`]: disk images (qcow2, raw, VMDK) and NBD exports as a
//!   [`cairn_engine::backup::BlockSource`].
//! - [`postgres`], [`mariadb`]: database servers (physical copies and dumps), with what a
//!   database snapshot records about them in [`database`].
//! - [`discover`]: the database servers of this host a source can name.
//! - [`libvirt`]: virtual machines by name: backup with changed-block tracking, the
//!   hypervisor operations, the XML of a recovered copy.
//! - [`source`]: one backup of any of those sources, the operation the CLI, the
//!   scheduler and the API all run; and an image snapshot restored to a file.
//! - [`process`]: running those programs (argument vectors, stderr into errors, a failed
//!   program fails the read of its output).

pub mod database;
pub mod discover;
pub mod image;
pub mod libvirt;
pub mod mariadb;
pub mod nbd;
pub mod postgres;
pub mod process;
pub mod qemu;
pub mod source;
