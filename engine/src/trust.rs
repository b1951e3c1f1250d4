//! Known repositories: what this host remembers of each repository it has opened, so
//! that whoever can write the storage, but knows no password, cannot swap a
//! repository's master key or turn its encryption off unnoticed (SSH's `known_hosts`,
//! for repositories).
//!
//! A repository's [`Identity`] is its id, its encryption and a fingerprint of its
//! master key. Changing any of them takes nothing but write access to `config` and
//! `keys/`: a planted key file the program opens without a password, and a `config`
//! re-MACed with that key, would have new backups sealed under a key the storage host
//! knows. So the first open on a host records the identity (trust on first use; `init`
//! records it too), and every later open must find the same one, at the same location
//! and under the same id anywhere else. A change is refused with
//! [`Error::IdentityChanged`] until a person accepts it ([`KnownRepositories::accept`],
//! `repo trust --accept`).
//!
//! The record is host state (a JSON file in the state directory), never in the
//! repository. Writes replace the file atomically under an advisory lock, so two
//! processes opening repositories at once do not lose each other's records.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::crypto::{Encryption, MasterKey};
use crate::error::{Error, IoContext, Result};
use crate::id::RepoId;

/// A fingerprint of a master key: a BLAKE3 key derivation of it, which tells keys apart
/// and reveals nothing of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyFingerprint(#[serde(with = "hex_array")] pub [u8; 32]);

impl KeyFingerprint {
    #[must_use]
    pub fn of(key: &MasterKey) -> Self {
        Self(blake3::derive_key(
            "cairn 2026-12 master key fingerprint",
            &key.to_bytes(),
        ))
    }
}

impl std::fmt::Display for KeyFingerprint {
    /// The first 16 bytes in hex, in groups of four: enough to compare by eye.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex = hex::encode(&self.0[..16]);
        let groups: Vec<&str> = (0..hex.len()).step_by(8).map(|i| &hex[i..i + 8]).collect();
        f.write_str(&groups.join("-"))
    }
}

/// What makes a repository the one a host knew.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub id: RepoId,
    pub encryption: Encryption,
    pub key: KeyFingerprint,
}

impl Identity {
    fn differences(&self, other: &Self) -> Vec<String> {
        let enc = |e: Encryption| match e {
            Encryption::Aes256Gcm => "aes-256-gcm",
            Encryption::None => "none",
        };
        let mut out = Vec::new();
        if self.id != other.id {
            out.push(format!("its id was {}, now {}", self.id, other.id));
        }
        if self.encryption != other.encryption {
            out.push(format!(
                "its encryption was {}, now {}",
                enc(self.encryption),
                enc(other.encryption)
            ));
        }
        if self.key != other.key {
            out.push(format!(
                "its master key was {}, now {}",
                self.key, other.key
            ));
        }
        out
    }
}

/// One remembered repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Known {
    pub location: String,
    #[serde(flatten)]
    pub identity: Identity,
    pub first_seen: DateTime<Utc>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    version: u32,
    repositories: Vec<Known>,
}

/// Whether `identity` at `location` is known and unchanged, new, or changed (an error).
fn compare(record: &Record, location: &str, identity: &Identity) -> Result<Seen> {
    let here = record.repositories.iter().find(|k| k.location == location);
    let elsewhere = record
        .repositories
        .iter()
        .find(|k| k.location != location && k.identity.id == identity.id);
    for (known, how) in [(here, "at this location"), (elsewhere, "under this id")] {
        let Some(known) = known else { continue };
        let diff = known.identity.differences(identity);
        if !diff.is_empty() {
            return Err(Error::IdentityChanged {
                location: location.to_owned(),
                detail: format!(
                    "the repository this host knew {how} ({}, first opened {}) has changed: {}",
                    known.location,
                    known.first_seen.format("%Y-%m-%d %H:%M UTC"),
                    diff.join("; ")
                ),
            });
        }
    }
    Ok(if here.is_some() {
        Seen::Known
    } else {
        Seen::New
    })
}

/// What [`KnownRepositories::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Known, unchanged.
    Known,
    /// Never seen on this host: now recorded.
    New,
}

/// The record of known repositories in one file (see the module docs).
#[derive(Debug, Clone)]
pub struct KnownRepositories {
    path: PathBuf,
}

impl KnownRepositories {
    /// The record kept in `path` (created on first use).
    #[must_use]
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The record of this host: `known-repositories.json` in [`crate::host::state_dir`].
    #[must_use]
    pub fn of_this_host() -> Self {
        Self::at(crate::host::state_dir().join("known-repositories.json"))
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Compares `identity`, found at `location`, with what this host knows: records it
    /// if it is new, fails with [`Error::IdentityChanged`] if it differs from what was
    /// recorded for this location or for this repository id elsewhere.
    ///
    /// A host state this process cannot read or write (another user's, a read-only
    /// disk) checks what it can and records nothing, with a warning: the check protects
    /// only hosts that remember.
    pub fn check(&self, location: &str, identity: &Identity) -> Result<Seen> {
        let record = match self.read() {
            Ok(r) => r,
            Err(e) if e.kind() == crate::ErrorKind::Io => {
                self.warn_unrecorded(&e);
                return Ok(Seen::New);
            }
            Err(e) => return Err(e),
        };
        // The common case, without a lock or a write: known and unchanged.
        if compare(&record, location, identity)? == Seen::Known {
            return Ok(Seen::Known);
        }
        let recorded = self.update(|record| {
            let seen = compare(record, location, identity)?;
            if seen == Seen::New {
                record.repositories.push(Known {
                    location: location.to_owned(),
                    identity: *identity,
                    first_seen: Utc::now(),
                });
            }
            Ok((seen, seen == Seen::New))
        });
        match recorded {
            Err(e) if e.kind() == crate::ErrorKind::Io => {
                self.warn_unrecorded(&e);
                Ok(Seen::New)
            }
            other => other,
        }
    }

    fn warn_unrecorded(&self, e: &Error) {
        tracing::warn!(
            "cannot use this host's record of known repositories ({e}): the repository's \
             identity is not recorded, and a key swapped later would not be noticed here"
        );
    }

    /// Records `identity` for `location`, replacing what was known there and under its
    /// id (a person decided the change is legitimate). Returns what was replaced.
    pub fn accept(&self, location: &str, identity: &Identity) -> Result<Vec<Known>> {
        self.update(|record| {
            let (gone, kept): (Vec<Known>, Vec<Known>) = std::mem::take(&mut record.repositories)
                .into_iter()
                .partition(|k| {
                    k.location == location
                        || (k.identity.id == identity.id && k.identity != *identity)
                });
            record.repositories = kept;
            record.repositories.push(Known {
                location: location.to_owned(),
                identity: *identity,
                first_seen: Utc::now(),
            });
            Ok((gone, true))
        })
    }

    /// Every known repository.
    pub fn list(&self) -> Result<Vec<Known>> {
        Ok(self.read()?.repositories)
    }

    /// Forgets what is known at `location`; returns whether anything was.
    pub fn forget(&self, location: &str) -> Result<bool> {
        self.update(|record| {
            let before = record.repositories.len();
            record.repositories.retain(|k| k.location != location);
            let changed = record.repositories.len() != before;
            Ok((changed, changed))
        })
    }

    fn read(&self) -> Result<Record> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::corrupt(
                    self.path.display().to_string(),
                    format!("unreadable record of known repositories ({e}); move it away to start a new one"),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record {
                version: 1,
                repositories: Vec::new(),
            }),
            Err(e) => Err(Error::io(self.path.display().to_string(), e)),
        }
    }

    /// Runs `change` on the record under the lock; writes it back when it says so.
    fn update<T>(&self, change: impl FnOnce(&mut Record) -> Result<(T, bool)>) -> Result<T> {
        let what = || self.path.display().to_string();
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).ctx(|| dir.display().to_string())?;
        let lock_path = self.path.with_extension("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .ctx(|| lock_path.display().to_string())?;
        let _guard = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| Error::io(lock_path.display().to_string(), e.into()))?;
        let mut record = self.read()?;
        let (out, write) = change(&mut record)?;
        if write {
            record.version = 1;
            let bytes = serde_json::to_vec_pretty(&record)
                .map_err(|e| Error::InvalidInput(format!("encoding {}: {e}", what())))?;
            let tmp = self.path.with_extension("json.tmp");
            (|| {
                let mut f = OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &self.path)?;
                File::open(dir)?.sync_all()
            })()
            .ctx(what)?;
        }
        Ok(out)
    }
}

mod hex_array {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(s).map_err(serde::de::Error::custom)?;
        v.try_into()
            .map_err(|_| serde::de::Error::custom("a fingerprint is 32 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(key: &MasterKey, enc: Encryption, id: u8) -> Identity {
        Identity {
            id: RepoId(crate::id::Id::from_bytes([id; 32])),
            encryption: enc,
            key: KeyFingerprint::of(key),
        }
    }

    #[test]
    fn a_changed_key_encryption_or_id_is_refused_until_accepted() {
        let d = tempfile::tempdir().unwrap();
        let known = KnownRepositories::at(d.path().join("state/known.json"));
        let key = MasterKey::generate();
        let real = identity(&key, Encryption::Aes256Gcm, 1);
        assert_eq!(known.check("/srv/r", &real).unwrap(), Seen::New);
        assert_eq!(known.check("/srv/r", &real).unwrap(), Seen::Known);
        // The same repository copied elsewhere is the same repository.
        assert_eq!(known.check("/mnt/copy", &real).unwrap(), Seen::New);

        let planted = MasterKey::generate();
        for (bad, says) in [
            (identity(&planted, Encryption::Aes256Gcm, 1), "master key"),
            (
                identity(&planted, Encryption::None, 1),
                "encryption was aes-256-gcm, now none",
            ),
            (identity(&key, Encryption::Aes256Gcm, 2), "its id was"),
        ] {
            let err = known.check("/srv/r", &bad).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::IdentityChanged);
            assert!(err.to_string().contains(says), "{err}");
        }
        // Under a known id at a new location, a different key is refused too.
        let err = known
            .check("/elsewhere", &identity(&planted, Encryption::Aes256Gcm, 1))
            .unwrap_err();
        assert!(err.to_string().contains("under this id"), "{err}");

        // Accepted on purpose: the new identity is the known one, the old one is gone.
        let new = identity(&planted, Encryption::Aes256Gcm, 1);
        let replaced = known.accept("/srv/r", &new).unwrap();
        assert_eq!(replaced.len(), 2, "{replaced:?}");
        assert_eq!(known.check("/srv/r", &new).unwrap(), Seen::Known);
        assert!(known.check("/srv/r", &real).is_err());
        assert!(known.forget("/srv/r").unwrap());
        assert_eq!(known.check("/srv/r", &real).unwrap(), Seen::New);
    }

    #[test]
    fn fingerprints_tell_keys_apart_and_print_short() {
        let a = MasterKey::generate();
        let b = MasterKey::generate();
        assert_eq!(KeyFingerprint::of(&a), KeyFingerprint::of(&a.clone()));
        assert_ne!(KeyFingerprint::of(&a), KeyFingerprint::of(&b));
        let shown = KeyFingerprint::of(&a).to_string();
        assert_eq!(shown.len(), 35, "{shown}");
    }

    #[test]
    fn an_unreadable_record_is_an_error_not_an_empty_record() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("known.json");
        std::fs::write(&path, b"{not json").unwrap();
        let known = KnownRepositories::at(&path);
        let key = MasterKey::generate();
        let err = known
            .check("/r", &identity(&key, Encryption::None, 1))
            .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        assert_eq!(std::fs::read(&path).unwrap(), b"{not json");
    }
}
