//! The blob directory of each served repository: which blob ids each pack holds, as the
//! clients that stored the packs reported them (known-chunk negotiation, see
//! `storage` and `cairn_engine::store::BlobDirectory`).
//!
//! The server cannot read a pack's trailer (it is sealed with the repository's key), so
//! it keeps what it is told: one SQLite file per repository,
//! `<state dir>/directories/<name>.sqlite`, rows of (blob, pack). What it answers is a
//! hint: a client indexes a blob only after reading the named pack's trailer and
//! authenticating it, so a false report costs a read, never a backup.
//!
//! Who may learn what: a question names a repository its token opens, and is answered
//! from that repository's rows only. Blob ids are keyed hashes under the repository's
//! master key, so the ids of one repository mean nothing in another; and a host with a
//! token for a repository can read every pack of it (and so every trailer) anyway. The
//! directory tells a client nothing it could not have learned itself, faster.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use cairn_engine::id::{BlobId, Id, PackId};
use cairn_engine::store::{Backend, BlobDirectory, FileKind};
use rusqlite::{params, Connection};

/// Length of an id on the wire and in the table.
pub const ID_LEN: usize = 32;

/// The directories of a site's repositories, opened as they are first used.
pub struct Directories {
    dir: PathBuf,
    open: Mutex<HashMap<String, Arc<Mutex<Connection>>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("the blob directory {path}: {source}")]
    Db {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the blob directory {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, DirectoryError>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS blobs (
    blob BLOB NOT NULL,
    pack BLOB NOT NULL,
    PRIMARY KEY (blob, pack)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs (pack);
";

impl Directories {
    /// The directories kept under `state_dir/directories/`.
    #[must_use]
    pub fn at(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("directories"),
            open: Mutex::default(),
        }
    }

    fn path_of(&self, repository: &str) -> PathBuf {
        // Repository names are the site's own (checked by `repos`), but a name is not a
        // path: hash it.
        let name = blake3::hash(repository.as_bytes()).to_hex();
        self.dir.join(format!("{}.sqlite", &name[..32]))
    }

    fn connection(&self, repository: &str) -> Result<Arc<Mutex<Connection>>> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = open.get(repository) {
            return Ok(c.clone());
        }
        let path = self.path_of(repository);
        let db = |source| DirectoryError::Db {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(|source| DirectoryError::Io {
            path: self.dir.display().to_string(),
            source,
        })?;
        let conn = Connection::open(&path).map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        let conn = Arc::new(Mutex::new(conn));
        open.insert(repository.to_owned(), conn.clone());
        Ok(conn)
    }

    fn with<T>(
        &self,
        repository: &str,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let conn = self.connection(repository)?;
        let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut conn).map_err(|source| DirectoryError::Db {
            path: self.path_of(repository).display().to_string(),
            source,
        })
    }

    /// Records that `pack` of `repository` holds `blobs`.
    pub fn record(
        &self,
        repository: &str,
        pack: &[u8; ID_LEN],
        blobs: &[[u8; ID_LEN]],
    ) -> Result<()> {
        self.with(repository, |c| {
            let tx = c.transaction()?;
            {
                let mut insert =
                    tx.prepare_cached("INSERT OR IGNORE INTO blobs (blob, pack) VALUES (?1, ?2)")?;
                for blob in blobs {
                    insert.execute(params![&blob[..], &pack[..]])?;
                }
            }
            tx.commit()
        })
    }

    /// Of `ids`, those recorded in `repository`, each with every pack said to hold it.
    pub fn find(
        &self,
        repository: &str,
        ids: &[[u8; ID_LEN]],
    ) -> Result<Vec<([u8; ID_LEN], [u8; ID_LEN])>> {
        self.with(repository, |c| {
            let mut select = c.prepare_cached("SELECT pack FROM blobs WHERE blob = ?1")?;
            let mut found = Vec::new();
            for id in ids {
                let packs = select.query_map(params![&id[..]], |row| row.get::<_, Vec<u8>>(0))?;
                for pack in packs {
                    if let Ok(pack) = <[u8; ID_LEN]>::try_from(pack?.as_slice()) {
                        found.push((*id, pack));
                    }
                }
            }
            Ok(found)
        })
    }

    /// Forgets `pack` of `repository` (removed from storage).
    pub fn forget_pack(&self, repository: &str, pack: &[u8; ID_LEN]) -> Result<()> {
        self.with(repository, |c| {
            c.execute("DELETE FROM blobs WHERE pack = ?1", params![&pack[..]])?;
            Ok(())
        })
    }
}

impl Directories {
    /// [`Self::find`], answering only for packs `storage` still holds: the rows of packs
    /// removed behind the server's back (a prune by path) are dropped on the way.
    pub fn find_stored(
        &self,
        repository: &str,
        ids: &[[u8; ID_LEN]],
        storage: &dyn Backend,
    ) -> io::Result<Vec<([u8; ID_LEN], [u8; ID_LEN])>> {
        let found = self.find(repository, ids).map_err(io::Error::other)?;
        let mut stored: HashMap<[u8; ID_LEN], bool> = HashMap::new();
        let mut answer = Vec::new();
        for (blob, pack) in found {
            let here = match stored.get(&pack) {
                Some(here) => *here,
                None => {
                    let here = match storage.size(FileKind::Pack, &hex::encode(pack)) {
                        Ok(_) => true,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                        Err(e) => return Err(e),
                    };
                    stored.insert(pack, here);
                    here
                }
            };
            if here {
                answer.push((blob, pack));
            }
        }
        for (pack, _) in stored.iter().filter(|(_, here)| !**here) {
            self.forget_pack(repository, pack)
                .map_err(io::Error::other)?;
        }
        Ok(answer)
    }
}

/// One served repository's directory, as the engine asks it
/// ([`cairn_engine::store::BlobDirectory`]): what the server's own operations on that
/// repository report and ask, in process, as its remote clients do over HTTP.
pub struct ServedDirectory {
    pub directories: Arc<Directories>,
    pub repository: String,
    pub storage: Arc<dyn Backend>,
}

impl BlobDirectory for ServedDirectory {
    fn report(&self, pack: &PackId, blobs: &[BlobId]) -> io::Result<()> {
        let blobs: Vec<[u8; ID_LEN]> = blobs.iter().map(|b| *b.as_bytes()).collect();
        self.directories
            .record(&self.repository, pack.as_bytes(), &blobs)
            .map_err(io::Error::other)
    }

    fn locate(&self, ids: &[BlobId]) -> io::Result<Vec<(BlobId, PackId)>> {
        let ids: Vec<[u8; ID_LEN]> = ids.iter().map(|b| *b.as_bytes()).collect();
        Ok(self
            .directories
            .find_stored(&self.repository, &ids, &*self.storage)?
            .into_iter()
            .map(|(blob, pack)| (BlobId(Id::from_bytes(blob)), PackId(Id::from_bytes(pack))))
            .collect())
    }
}

/// Splits a body of concatenated ids; `None` when its length is not a multiple of one.
#[must_use]
pub fn ids_of(body: &[u8]) -> Option<Vec<[u8; ID_LEN]>> {
    if body.len() % ID_LEN != 0 {
        return None;
    }
    Some(
        body.chunks_exact(ID_LEN)
            .map(|c| <[u8; ID_LEN]>::try_from(c).unwrap_or([0; ID_LEN]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_blobs_are_found_in_their_repository_only_and_forgotten_with_their_pack() {
        let d = tempfile::tempdir().unwrap();
        let dirs = Directories::at(d.path());
        let (p1, p2) = ([1; 32], [2; 32]);
        dirs.record("a", &p1, &[[10; 32], [11; 32]]).unwrap();
        dirs.record("a", &p2, &[[11; 32]]).unwrap();
        dirs.record("a", &p2, &[[11; 32]]).unwrap(); // again: no second row
        let mut found = dirs.find("a", &[[11; 32], [12; 32]]).unwrap();
        found.sort();
        assert_eq!(found, vec![([11; 32], p1), ([11; 32], p2)]);
        assert!(dirs.find("b", &[[10; 32], [11; 32]]).unwrap().is_empty());
        dirs.forget_pack("a", &p1).unwrap();
        assert_eq!(
            dirs.find("a", &[[10; 32], [11; 32]]).unwrap(),
            vec![([11; 32], p2)]
        );
        // Kept across a restart.
        drop(dirs);
        let dirs = Directories::at(d.path());
        assert_eq!(dirs.find("a", &[[11; 32]]).unwrap(), vec![([11; 32], p2)]);
    }

    #[test]
    fn what_the_servers_own_operations_write_is_reported_and_gone_packs_are_not_answered() {
        use cairn_engine::blob::BlobKind;
        use cairn_engine::config::Config;
        use cairn_engine::crypto::Encryption;
        use cairn_engine::keyfile::KdfParams;
        use cairn_engine::repository::OpenOptions;
        use cairn_engine::saver::BlobSaver;
        use cairn_engine::store::directed::Directed;
        use cairn_engine::store::LocalBackend;
        use cairn_engine::Repository;

        let d = tempfile::tempdir().unwrap();
        let directories = Arc::new(Directories::at(&d.path().join("state")));
        let storage: Arc<dyn Backend> = Arc::new(LocalBackend::new(d.path().join("repo")));
        let directory = Arc::new(ServedDirectory {
            directories: directories.clone(),
            repository: "r".into(),
            storage: storage.clone(),
        });
        let opts = OpenOptions {
            index: Some(d.path().join("index.sqlite")),
            ..OpenOptions::default()
        };
        let repo = Repository::init_on(
            Arc::new(Directed::new(storage.clone(), directory)),
            &opts,
            b"pw",
            Config::new(Encryption::Aes256Gcm),
            KdfParams::TEST_ONLY_WEAK,
        )
        .unwrap();
        // A job's saver writes a pack: its blobs are in the directory, under the name
        // the site knows the repository by.
        let saver = BlobSaver::new(&repo);
        let ids: Vec<[u8; ID_LEN]> = (0..3u8)
            .map(|i| *saver.save(BlobKind::Data, &[i; 5000]).unwrap().0.as_bytes())
            .collect();
        saver.flush().unwrap();
        let found = directories.find_stored("r", &ids, &*storage).unwrap();
        assert_eq!(found.len(), 3, "{found:?}");
        let pack = found[0].1;
        assert!(found.iter().all(|(_, p)| *p == pack));
        assert!(directories.find("other", &ids).unwrap().is_empty());
        // The pack removed by path (a prune run by hand): not answered, and forgotten.
        storage.remove(FileKind::Pack, &hex::encode(pack)).unwrap();
        assert!(directories
            .find_stored("r", &ids, &*storage)
            .unwrap()
            .is_empty());
        assert!(directories.find("r", &ids).unwrap().is_empty());
    }

    #[test]
    fn a_body_must_be_whole_ids() {
        assert_eq!(ids_of(&[7; 64]).unwrap(), vec![[7; 32], [7; 32]]);
        assert!(ids_of(&[]).unwrap().is_empty());
        assert!(ids_of(&[7; 33]).is_none());
    }
}
