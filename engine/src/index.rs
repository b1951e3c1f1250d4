//! The blob index: blob id -> (pack, offset, length), in SQLite (`index.sqlite`, WAL).
//!
//! A cache, never the only copy of a fact: every row comes from a pack trailer, and
//! [`Index::sync`] brings it in line with the packs that exist (adding packs written by
//! other processes, dropping packs that are gone). Deleting the file loses nothing.
//! Rows are inserted only after their pack is durable, so an id found here is stored.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::blob::BlobKind;
use crate::error::{Error, Result};
use crate::id::{BlobId, Id, PackId};
use crate::pack::PackEntry;

/// Where a blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: PackId,
    pub kind: BlobKind,
    pub offset: u64,
    pub length: u32,
    pub raw_length: u32,
}

/// Totals over the whole index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexTotals {
    pub packs: u64,
    pub pack_bytes: u64,
    pub blobs: u64,
    pub stored_bytes: u64,
    pub raw_bytes: u64,
}

pub struct Index {
    conn: Mutex<Connection>,
}

const SCHEMA_VERSION: i64 = 1;

fn db_err(e: rusqlite::Error) -> Error {
    Error::io("index.sqlite", std::io::Error::other(e.to_string()))
}

impl Index {
    /// Opens (creating if needed) the index file. Falls back to an in-memory index when
    /// the file cannot be opened (a read-only repository), which `sync` then fills.
    pub fn open(path: &Path) -> Result<Self> {
        // Owner-only like every repository file; SQLite gives its -wal and -shm files the
        // mode of the database file.
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path);
        }
        let conn = match Connection::open(path) {
            Ok(c) => match Self::prepare(&c, true) {
                Ok(()) => c,
                Err(e) => {
                    tracing::warn!(
                        "index {} unusable ({e}); using a temporary one",
                        path.display()
                    );
                    Self::memory_conn()?
                }
            },
            Err(e) => {
                tracing::warn!(
                    "index {} unusable ({e}); using a temporary one",
                    path.display()
                );
                Self::memory_conn()?
            }
        };
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// An index that lives in memory only.
    pub fn in_memory() -> Result<Self> {
        Ok(Self {
            conn: Mutex::new(Self::memory_conn()?),
        })
    }

    fn memory_conn() -> Result<Connection> {
        let c = Connection::open_in_memory().map_err(db_err)?;
        Self::prepare(&c, false)?;
        Ok(c)
    }

    fn prepare(c: &Connection, file: bool) -> Result<()> {
        c.busy_timeout(std::time::Duration::from_secs(60))
            .map_err(db_err)?;
        if file {
            c.pragma_update(None, "journal_mode", "WAL")
                .map_err(db_err)?;
            c.pragma_update(None, "synchronous", "NORMAL")
                .map_err(db_err)?;
        }
        c.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS packs(
                 id BLOB PRIMARY KEY, size INTEGER NOT NULL, blobs INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS blobs(
                 id BLOB PRIMARY KEY, pack BLOB NOT NULL, kind INTEGER NOT NULL,
                 offset INTEGER NOT NULL, length INTEGER NOT NULL, raw_length INTEGER NOT NULL
             ) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs(pack);",
        )
        .map_err(db_err)?;
        let v: Option<i64> = c
            .query_row("SELECT value FROM meta WHERE key='schema'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_err)?;
        match v {
            None => {
                c.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES('schema', ?1)",
                    [SCHEMA_VERSION],
                )
                .map_err(db_err)?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(other) => {
                return Err(Error::corrupt(
                    "index.sqlite",
                    format!("schema {other} unknown; delete it and run `repo index rebuild`"),
                ))
            }
        }
        Ok(())
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (its own transactions).
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a durable pack and its blobs. A blob already indexed in another pack keeps
    /// its first location.
    pub fn add_pack(&self, pack: &PackId, size: u64, entries: &[PackEntry]) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(db_err)?;
        {
            tx.execute(
                "INSERT OR REPLACE INTO packs(id, size, blobs) VALUES(?1, ?2, ?3)",
                params![&pack.as_bytes()[..], size as i64, entries.len() as i64],
            )
            .map_err(db_err)?;
            let mut st = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO blobs(id, pack, kind, offset, length, raw_length)
                     VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(db_err)?;
            for e in entries {
                st.execute(params![
                    &e.id.as_bytes()[..],
                    &pack.as_bytes()[..],
                    e.kind as u8,
                    e.offset as i64,
                    e.length,
                    e.raw_length
                ])
                .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    /// Forgets a pack and the blobs located in it.
    pub fn remove_pack(&self, pack: &PackId) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(db_err)?;
        tx.execute("DELETE FROM blobs WHERE pack = ?1", [&pack.as_bytes()[..]])
            .map_err(db_err)?;
        tx.execute("DELETE FROM packs WHERE id = ?1", [&pack.as_bytes()[..]])
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    pub fn lookup(&self, id: &BlobId) -> Result<Option<BlobLocation>> {
        let c = self.conn();
        let mut st = c
            .prepare_cached(
                "SELECT pack, kind, offset, length, raw_length FROM blobs WHERE id = ?1",
            )
            .map_err(db_err)?;
        let row = st
            .query_row([&id.as_bytes()[..]], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, u8>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, u32>(4)?,
                ))
            })
            .optional()
            .map_err(db_err)?;
        row.map(|(pack, kind, offset, length, raw_length)| {
            Ok(BlobLocation {
                pack: PackId(
                    Id::from_slice(&pack)
                        .ok_or_else(|| Error::corrupt("index.sqlite", "bad pack id"))?,
                ),
                kind: BlobKind::from_u8(kind)
                    .ok_or_else(|| Error::corrupt("index.sqlite", "bad blob kind"))?,
                offset: u64::try_from(offset)
                    .map_err(|_| Error::corrupt("index.sqlite", "bad offset"))?,
                length,
                raw_length,
            })
        })
        .transpose()
    }

    pub fn contains(&self, id: &BlobId) -> Result<bool> {
        let c = self.conn();
        let mut st = c
            .prepare_cached("SELECT 1 FROM blobs WHERE id = ?1")
            .map_err(db_err)?;
        st.exists([&id.as_bytes()[..]]).map_err(db_err)
    }

    /// Ids of all indexed packs.
    pub fn packs(&self) -> Result<Vec<PackId>> {
        let c = self.conn();
        let mut st = c.prepare_cached("SELECT id FROM packs").map_err(db_err)?;
        let rows = st
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .map_err(db_err)?;
        let mut out = Vec::new();
        for r in rows {
            let b = r.map_err(db_err)?;
            out.push(PackId(
                Id::from_slice(&b).ok_or_else(|| Error::corrupt("index.sqlite", "bad pack id"))?,
            ));
        }
        Ok(out)
    }

    pub fn totals(&self) -> Result<IndexTotals> {
        let c = self.conn();
        let (packs, pack_bytes): (i64, i64) = c
            .query_row(
                "SELECT count(*), coalesce(sum(size),0) FROM packs",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(db_err)?;
        let (blobs, stored, raw): (i64, i64, i64) = c
            .query_row(
                "SELECT count(*), coalesce(sum(length),0), coalesce(sum(raw_length),0) FROM blobs",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(db_err)?;
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(IndexTotals {
            packs: u(packs),
            pack_bytes: u(pack_bytes),
            blobs: u(blobs),
            stored_bytes: u(stored),
            raw_bytes: u(raw),
        })
    }

    /// Empties the index (before a rebuild).
    pub fn clear(&self) -> Result<()> {
        self.conn()
            .execute_batch("DELETE FROM blobs; DELETE FROM packs;")
            .map_err(db_err)
    }
}
