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

/// One row of a pack in [`Index::scan_by_pack`]: (row number, stored length).
pub type PackRow = (u64, u32);

/// Totals over the whole index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexTotals {
    pub packs: u64,
    pub pack_bytes: u64,
    /// Distinct blobs.
    pub blobs: u64,
    /// Blob copies: more than `blobs` when a blob is stored in several packs.
    pub locations: u64,
    pub stored_bytes: u64,
    pub raw_bytes: u64,
}

pub struct Index {
    conn: Mutex<Connection>,
}

/// 2: a blob may be indexed in several packs (a repack copies before it deletes), and
/// rows have rowids (prune's bitmap). An index of another schema is dropped and rebuilt.
const SCHEMA_VERSION: i64 = 2;

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
            "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        )
        .map_err(db_err)?;
        let v: Option<i64> = c
            .query_row("SELECT value FROM meta WHERE key='schema'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_err)?;
        if v.is_some_and(|v| v != SCHEMA_VERSION) {
            // A derived cache: drop it, and the next sync reads every pack trailer again.
            tracing::info!("index schema {v:?} replaced by {SCHEMA_VERSION}; rebuilding it");
            c.execute_batch("DROP TABLE IF EXISTS blobs; DROP TABLE IF EXISTS packs;")
                .map_err(db_err)?;
        }
        c.execute_batch(
            "CREATE TABLE IF NOT EXISTS packs(
                 id BLOB PRIMARY KEY, size INTEGER NOT NULL, blobs INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS blobs(
                 id BLOB NOT NULL, pack BLOB NOT NULL, kind INTEGER NOT NULL,
                 offset INTEGER NOT NULL, length INTEGER NOT NULL, raw_length INTEGER NOT NULL,
                 UNIQUE(id, pack));
             CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs(pack);
             CREATE TABLE IF NOT EXISTS shard_stamps(
                 shard TEXT PRIMARY KEY, stamp INTEGER NOT NULL) WITHOUT ROWID;",
        )
        .map_err(db_err)?;
        c.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES('schema', ?1)",
            [SCHEMA_VERSION],
        )
        .map_err(db_err)?;
        Ok(())
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (its own transactions).
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a durable pack and its blobs. A blob may be indexed in several packs;
    /// lookups return one of them.
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

    /// Forgets a pack and the blob locations in it (copies in other packs stay).
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
                "SELECT pack, kind, offset, length, raw_length FROM blobs WHERE id = ?1 LIMIT 1",
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
        self.packs_from(0)
    }

    /// Indexed packs whose id starts with the byte `first`.
    pub fn packs_starting_with(&self, first: u8) -> Result<Vec<PackId>> {
        self.packs_from(u16::from(first) + 1)
    }

    /// `range` 0: every pack; `b + 1`: the packs whose first byte is `b`.
    fn packs_from(&self, range: u16) -> Result<Vec<PackId>> {
        let c = self.conn();
        let mut st = c
            .prepare_cached(
                "SELECT id FROM packs WHERE ?1 = 0 OR (id >= ?2 AND (?1 = 256 OR id < ?3))",
            )
            .map_err(db_err)?;
        let lo = [range.saturating_sub(1) as u8];
        let hi = [range.min(255) as u8];
        let rows = st
            .query_map(params![range, &lo[..], &hi[..]], |r| r.get::<_, Vec<u8>>(0))
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
        let (blobs, locations, stored, raw): (i64, i64, i64, i64) = c
            .query_row(
                "SELECT count(DISTINCT id), count(*), coalesce(sum(length),0), coalesce(sum(raw_length),0) FROM blobs",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .map_err(db_err)?;
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(IndexTotals {
            packs: u(packs),
            pack_bytes: u(pack_bytes),
            blobs: u(blobs),
            locations: u(locations),
            stored_bytes: u(stored),
            raw_bytes: u(raw),
        })
    }

    /// The largest row number (0 when empty). Rows added later have larger numbers.
    pub fn max_row(&self) -> Result<u64> {
        let v: i64 = self
            .conn()
            .query_row("SELECT coalesce(max(rowid), 0) FROM blobs", [], |r| {
                r.get(0)
            })
            .map_err(db_err)?;
        Ok(u64::try_from(v).unwrap_or(0))
    }

    /// The row numbers of every location of a blob (none when it is not indexed).
    pub fn rows_of(&self, id: &BlobId) -> Result<Vec<u64>> {
        let c = self.conn();
        let mut st = c
            .prepare_cached("SELECT rowid FROM blobs WHERE id = ?1")
            .map_err(db_err)?;
        let rows = st
            .query_map([&id.as_bytes()[..]], |r| r.get::<_, i64>(0))
            .map_err(db_err)?;
        rows.map(|r| r.map(|v| u64::try_from(v).unwrap_or(0)).map_err(db_err))
            .collect()
    }

    /// The packs holding a copy of a blob (none when it is not indexed).
    pub fn packs_of(&self, id: &BlobId) -> Result<Vec<PackId>> {
        let c = self.conn();
        let mut st = c
            .prepare_cached("SELECT pack FROM blobs WHERE id = ?1")
            .map_err(db_err)?;
        let rows = st
            .query_map([&id.as_bytes()[..]], |r| r.get::<_, Vec<u8>>(0))
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

    /// Calls `f(pack, rows)` once per pack, with the (row number, stored length) of each
    /// of its rows numbered at most `max_row`, streaming (one pack's rows in memory).
    /// `f` must not use the index.
    pub fn scan_by_pack(
        &self,
        max_row: u64,
        f: &mut dyn FnMut(PackId, &[PackRow]) -> Result<()>,
    ) -> Result<()> {
        let c = self.conn();
        let mut st = c
            .prepare("SELECT pack, rowid, length FROM blobs WHERE rowid <= ?1 ORDER BY pack")
            .map_err(db_err)?;
        let mut rows = st
            .query([i64::try_from(max_row).unwrap_or(i64::MAX)])
            .map_err(db_err)?;
        let mut current: Option<PackId> = None;
        let mut group: Vec<PackRow> = Vec::new();
        while let Some(r) = rows.next().map_err(db_err)? {
            let pack: Vec<u8> = r.get(0).map_err(db_err)?;
            let row: i64 = r.get(1).map_err(db_err)?;
            let len: u32 = r.get(2).map_err(db_err)?;
            let pack = PackId(
                Id::from_slice(&pack)
                    .ok_or_else(|| Error::corrupt("index.sqlite", "bad pack id"))?,
            );
            if let Some(p) = current.filter(|p| *p != pack) {
                f(p, &group)?;
                group.clear();
            }
            current = Some(pack);
            group.push((u64::try_from(row).unwrap_or(0), len));
        }
        if let Some(p) = current {
            f(p, &group)?;
        }
        Ok(())
    }

    /// The rows of one pack: (row number, entry).
    pub fn pack_rows(&self, pack: &PackId) -> Result<Vec<(u64, PackEntry)>> {
        let c = self.conn();
        let mut st = c
            .prepare_cached(
                "SELECT rowid, id, kind, offset, length, raw_length FROM blobs WHERE pack = ?1 ORDER BY offset",
            )
            .map_err(db_err)?;
        let rows = st
            .query_map([&pack.as_bytes()[..]], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, u8>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, u32>(4)?,
                    r.get::<_, u32>(5)?,
                ))
            })
            .map_err(db_err)?;
        let bad = || Error::corrupt("index.sqlite", "bad row");
        let mut out = Vec::new();
        for r in rows {
            let (row, id, kind, offset, length, raw_length) = r.map_err(db_err)?;
            out.push((
                u64::try_from(row).map_err(|_| bad())?,
                PackEntry {
                    id: BlobId(Id::from_slice(&id).ok_or_else(bad)?),
                    kind: BlobKind::from_u8(kind).ok_or_else(bad)?,
                    offset: u64::try_from(offset).map_err(|_| bad())?,
                    length,
                    raw_length,
                },
            ));
        }
        Ok(out)
    }

    /// Every indexed pack and its size in bytes.
    pub fn pack_sizes(&self) -> Result<std::collections::HashMap<PackId, u64>> {
        let c = self.conn();
        let mut st = c
            .prepare_cached("SELECT id, size FROM packs")
            .map_err(db_err)?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))
            .map_err(db_err)?;
        let mut out = std::collections::HashMap::new();
        for r in rows {
            let (id, size) = r.map_err(db_err)?;
            out.insert(
                PackId(
                    Id::from_slice(&id)
                        .ok_or_else(|| Error::corrupt("index.sqlite", "bad pack id"))?,
                ),
                u64::try_from(size).unwrap_or(0),
            );
        }
        Ok(out)
    }

    /// Size in bytes of an indexed pack.
    pub fn pack_size(&self, pack: &PackId) -> Result<Option<u64>> {
        let c = self.conn();
        let mut st = c
            .prepare_cached("SELECT size FROM packs WHERE id = ?1")
            .map_err(db_err)?;
        st.query_row([&pack.as_bytes()[..]], |r| r.get::<_, i64>(0))
            .optional()
            .map_err(db_err)
            .map(|v| v.map(|v| u64::try_from(v).unwrap_or(0)))
    }

    /// Empties the index (before a rebuild).
    pub fn clear(&self) -> Result<()> {
        self.conn()
            .execute_batch("DELETE FROM blobs; DELETE FROM packs; DELETE FROM shard_stamps;")
            .map_err(db_err)
    }

    /// The stamp of each pack shard as of the last time its packs were reconciled.
    pub fn shard_stamps(&self) -> Result<std::collections::HashMap<String, i64>> {
        let c = self.conn();
        let mut st = c
            .prepare_cached("SELECT shard, stamp FROM shard_stamps")
            .map_err(db_err)?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)
    }

    /// Records (`Some`) or forgets (`None`) the stamp a shard had when it was reconciled.
    pub fn set_shard_stamp(&self, shard: &str, stamp: Option<i64>) -> Result<()> {
        self.set_shard_stamps(&[(shard, stamp)])
    }

    /// [`Self::set_shard_stamp`] for many shards, in one transaction.
    pub fn set_shard_stamps(&self, stamps: &[(&str, Option<i64>)]) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(db_err)?;
        {
            let mut set = tx
                .prepare_cached("INSERT OR REPLACE INTO shard_stamps(shard, stamp) VALUES(?1, ?2)")
                .map_err(db_err)?;
            let mut unset = tx
                .prepare_cached("DELETE FROM shard_stamps WHERE shard = ?1")
                .map_err(db_err)?;
            for (shard, stamp) in stamps {
                match stamp {
                    Some(v) => set.execute(params![shard, v]),
                    None => unset.execute([shard]),
                }
                .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u8, offset: u64, length: u32) -> PackEntry {
        PackEntry {
            id: BlobId(Id::from_bytes([id; 32])),
            kind: BlobKind::Data,
            offset,
            length,
            raw_length: length,
        }
    }

    fn pack(n: u8) -> PackId {
        PackId(Id::from_bytes([n; 32]))
    }

    #[test]
    fn packs_and_their_blobs_are_found_counted_scanned_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let idx = Index::open(&d.path().join("index.sqlite")).unwrap();
        idx.add_pack(&pack(1), 100, &[entry(1, 12, 10), entry(2, 22, 20)])
            .unwrap();
        // Blob 2 stored twice (a repack copied it): both locations are known.
        idx.add_pack(&pack(2), 50, &[entry(2, 12, 20)]).unwrap();
        let b2 = BlobId(Id::from_bytes([2; 32]));
        assert!(idx.contains(&b2).unwrap());
        let mut packs = idx.packs_of(&b2).unwrap();
        packs.sort();
        assert_eq!(packs, [pack(1), pack(2)]);
        assert_eq!(idx.rows_of(&b2).unwrap().len(), 2);
        let loc = idx
            .lookup(&BlobId(Id::from_bytes([1; 32])))
            .unwrap()
            .unwrap();
        assert_eq!((loc.pack, loc.offset, loc.length), (pack(1), 12, 10));
        let t = idx.totals().unwrap();
        assert_eq!(
            (t.packs, t.pack_bytes, t.blobs, t.locations),
            (2, 150, 2, 3)
        );
        assert_eq!(idx.max_row().unwrap(), 3);
        // Streaming by pack, rows up to a bound only.
        let mut seen = Vec::new();
        idx.scan_by_pack(2, &mut |p, rows| {
            seen.push((p, rows.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [(pack(1), 2)]);
        assert_eq!(idx.pack_rows(&pack(1)).unwrap().len(), 2);
        assert_eq!(idx.pack_size(&pack(2)).unwrap(), Some(50));
        assert_eq!(idx.pack_sizes().unwrap().len(), 2);
        assert_eq!(idx.packs_starting_with(2).unwrap(), [pack(2)]);
        // Adding a pack again changes nothing.
        idx.add_pack(&pack(2), 50, &[entry(2, 12, 20)]).unwrap();
        assert_eq!(idx.totals().unwrap().locations, 3);
        // The other copy stays when one pack goes.
        idx.remove_pack(&pack(1)).unwrap();
        assert_eq!(idx.packs_of(&b2).unwrap(), [pack(2)]);
        assert!(!idx.contains(&BlobId(Id::from_bytes([1; 32]))).unwrap());
        // Shard stamps, and a clear that forgets everything.
        idx.set_shard_stamp("ab", Some(7)).unwrap();
        assert_eq!(idx.shard_stamps().unwrap().get("ab"), Some(&7));
        idx.set_shard_stamp("ab", None).unwrap();
        assert!(idx.shard_stamps().unwrap().is_empty());
        idx.clear().unwrap();
        assert_eq!(idx.totals().unwrap(), IndexTotals::default());
    }

    #[test]
    fn an_index_of_another_schema_or_garbage_is_replaced_not_trusted() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("index.sqlite");
        {
            let idx = Index::open(&path).unwrap();
            idx.add_pack(&pack(1), 100, &[entry(1, 12, 10)]).unwrap();
            idx.conn()
                .execute("UPDATE meta SET value = 1 WHERE key = 'schema'", [])
                .unwrap();
        }
        // An old schema: dropped, to be rebuilt from the packs.
        let idx = Index::open(&path).unwrap();
        assert_eq!(idx.totals().unwrap().packs, 0);
        drop(idx);
        // Not a database at all: a temporary index in memory instead of an error.
        std::fs::write(
            &path,
            b"this is not sqlite, but it is long enough to look like a file",
        )
        .unwrap();
        let _ = std::fs::remove_file(d.path().join("index.sqlite-wal"));
        let _ = std::fs::remove_file(d.path().join("index.sqlite-shm"));
        let idx = Index::open(&path).unwrap();
        idx.add_pack(&pack(3), 10, &[entry(3, 12, 1)]).unwrap();
        assert_eq!(idx.totals().unwrap().packs, 1);
    }
}
