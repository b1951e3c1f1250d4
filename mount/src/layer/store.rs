//! What a writable layer keeps on disk besides the upper files: `layer.sqlite` in the
//! layer directory, in WAL mode.
//!
//! - `layer`: what the layer is over (format, snapshot, path, chunk size);
//! - `nodes`: every inode the layer tracks (anything changed, created, or listed in a
//!   changed directory), with its attributes, its path in the snapshot (`origin`) when
//!   it came from there, and for files the size and `lower_limit`;
//! - `entries`: the complete listing of every directory that changed;
//! - `chunks`: which chunks of which file are local.
//!
//! Metadata operations commit at once (`synchronous=NORMAL`: they survive a crash of
//! the daemon, not a power loss); [`Store::sync`] commits with `synchronous=FULL`,
//! which makes everything before it durable too: what a file's or a directory's fsync
//! needs.

use std::path::Path;
use std::time::{Duration, SystemTime};

use cairn_engine::tree::NodeKind;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::view::{FsError, FsResult};

/// The layer directory's format (in the `layer` table).
pub const FORMAT: &str = "1";

fn db(e: rusqlite::Error) -> FsError {
    FsError::Io(format!("layer store: {e}"))
}

/// A tracked inode as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub id: u64,
    pub parent: u64,
    pub kind: NodeKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub target: Option<Vec<u8>>,
    pub origin: Option<Vec<u8>>,
    pub materialized: bool,
    pub size: u64,
    pub lower_limit: u64,
}

/// An entry of a changed directory: (directory, name, child).
pub type EntryRow = (u64, Vec<u8>, u64);

/// What a layer directory says it is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub snapshot: String,
    pub path: String,
    pub chunk: u64,
}

pub struct Store {
    conn: Connection,
    /// Something was committed since the last durable commit.
    unsynced: bool,
}

fn kind_code(k: NodeKind) -> i64 {
    match k {
        NodeKind::File => 0,
        NodeKind::Dir => 1,
        NodeKind::Symlink => 2,
        NodeKind::Fifo => 3,
        NodeKind::Socket => 4,
        NodeKind::Chardev => 5,
        NodeKind::Blockdev => 6,
    }
}

fn kind_of(c: i64) -> FsResult<NodeKind> {
    Ok(match c {
        0 => NodeKind::File,
        1 => NodeKind::Dir,
        2 => NodeKind::Symlink,
        3 => NodeKind::Fifo,
        4 => NodeKind::Socket,
        5 => NodeKind::Chardev,
        6 => NodeKind::Blockdev,
        _ => return Err(FsError::Io(format!("layer store: unknown node kind {c}"))),
    })
}

fn nanos(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

fn time(n: i64) -> SystemTime {
    let d = Duration::from_nanos(n.unsigned_abs());
    if n >= 0 {
        SystemTime::UNIX_EPOCH + d
    } else {
        SystemTime::UNIX_EPOCH - d
    }
}

fn i(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn u(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl Store {
    /// Opens (or makes) the store of the layer in `dir`, over `want`. A layer made over
    /// another snapshot or path, or by a newer format, is refused; its chunk size is kept.
    pub fn open(dir: &Path, want: &Identity) -> FsResult<(Self, Identity)> {
        let conn = Connection::open(dir.join("layer.sqlite")).map_err(db)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(db)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS layer (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS nodes (
                 id INTEGER PRIMARY KEY, parent INTEGER NOT NULL, kind INTEGER NOT NULL,
                 mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
                 nlink INTEGER NOT NULL, rdev INTEGER NOT NULL, atime INTEGER NOT NULL,
                 mtime INTEGER NOT NULL, ctime INTEGER NOT NULL, target BLOB, origin BLOB,
                 materialized INTEGER NOT NULL, size INTEGER NOT NULL,
                 lower_limit INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS entries (
                 dir INTEGER NOT NULL, name BLOB NOT NULL, child INTEGER NOT NULL,
                 PRIMARY KEY (dir, name)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS chunks (
                 node INTEGER NOT NULL, chunk INTEGER NOT NULL,
                 PRIMARY KEY (node, chunk)) WITHOUT ROWID;",
        )
        .map_err(db)?;
        let get = |k: &str| -> FsResult<Option<String>> {
            conn.query_row("SELECT value FROM layer WHERE key = ?1", [k], |r| r.get(0))
                .optional()
                .map_err(db)
        };
        let have = match get("format")? {
            None => None,
            Some(f) if f == FORMAT => Some(Identity {
                snapshot: get("snapshot")?.unwrap_or_default(),
                path: get("path")?.unwrap_or_default(),
                chunk: get("chunk")?
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(want.chunk),
            }),
            Some(f) => {
                return Err(FsError::Io(format!(
                    "{}: a writable layer of format {f}; this repo reads format {FORMAT}",
                    dir.display()
                )))
            }
        };
        let identity = match have {
            Some(h) => {
                if h.snapshot != want.snapshot || h.path != want.path {
                    return Err(FsError::Io(format!(
                        "{}: this layer is over snapshot {} path {:?}, not snapshot {} path {:?}",
                        dir.display(),
                        h.snapshot,
                        h.path,
                        want.snapshot,
                        want.path
                    )));
                }
                h
            }
            None => {
                for (k, v) in [
                    ("format", FORMAT.to_owned()),
                    ("snapshot", want.snapshot.clone()),
                    ("path", want.path.clone()),
                    ("chunk", want.chunk.to_string()),
                ] {
                    conn.execute("INSERT INTO layer (key, value) VALUES (?1, ?2)", [k, &v])
                        .map_err(db)?;
                }
                want.clone()
            }
        };
        Ok((
            Self {
                conn,
                unsynced: false,
            },
            identity,
        ))
    }

    /// Every tracked node, and every changed directory's entries.
    pub fn load(&self) -> FsResult<(Vec<NodeRow>, Vec<EntryRow>)> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, parent, kind, mode, uid, gid, nlink, rdev, atime, mtime, ctime,
                        target, origin, materialized, size, lower_limit FROM nodes",
            )
            .map_err(db)?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, u32>(4)?,
                    r.get::<_, u32>(5)?,
                    r.get::<_, u32>(6)?,
                    r.get::<_, i64>(7)?,
                    [
                        r.get::<_, i64>(8)?,
                        r.get::<_, i64>(9)?,
                        r.get::<_, i64>(10)?,
                    ],
                    r.get::<_, Option<Vec<u8>>>(11)?,
                    r.get::<_, Option<Vec<u8>>>(12)?,
                    r.get::<_, bool>(13)?,
                    r.get::<_, i64>(14)?,
                    r.get::<_, i64>(15)?,
                ))
            })
            .map_err(db)?;
        let mut nodes = Vec::new();
        for row in rows {
            let (id, parent, kind, mode, uid, gid, nlink, rdev, t, target, origin, m, size, ll) =
                row.map_err(db)?;
            nodes.push(NodeRow {
                id: u(id),
                parent: u(parent),
                kind: kind_of(kind)?,
                mode,
                uid,
                gid,
                nlink,
                rdev: u(rdev),
                atime: time(t[0]),
                mtime: time(t[1]),
                ctime: time(t[2]),
                target,
                origin,
                materialized: m,
                size: u(size),
                lower_limit: u(ll),
            });
        }
        let mut st = self
            .conn
            .prepare("SELECT dir, name, child FROM entries")
            .map_err(db)?;
        let entries = st
            .query_map([], |r| {
                Ok((
                    u(r.get::<_, i64>(0)?),
                    r.get::<_, Vec<u8>>(1)?,
                    u(r.get::<_, i64>(2)?),
                ))
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok((nodes, entries))
    }

    /// The local chunks of `node`.
    pub fn chunks(&self, node: u64) -> FsResult<Vec<u64>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT chunk FROM chunks WHERE node = ?1")
            .map_err(db)?;
        let rows = st
            .query_map([i(node)], |r| r.get::<_, i64>(0))
            .map_err(db)?
            .map(|r| r.map(u))
            .collect::<Result<Vec<_>, _>>()
            .map_err(db);
        rows
    }

    /// Runs `f` in one transaction, committed before returning.
    pub fn change<T>(&mut self, f: impl FnOnce(&Changes<'_>) -> FsResult<T>) -> FsResult<T> {
        let tx = self.conn.transaction().map_err(db)?;
        let out = f(&Changes { tx: &tx })?;
        tx.commit().map_err(db)?;
        self.unsynced = true;
        Ok(out)
    }

    /// Makes every change so far durable (nothing to do when none was made since).
    pub fn sync(&mut self) -> FsResult<()> {
        if self.unsynced {
            self.change_durably(|_| Ok(()))?;
        }
        Ok(())
    }

    /// Like [`Self::change`], and makes it and every earlier change durable.
    pub fn change_durably<T>(
        &mut self,
        f: impl FnOnce(&Changes<'_>) -> FsResult<T>,
    ) -> FsResult<T> {
        self.conn
            .execute_batch("PRAGMA synchronous=FULL")
            .map_err(db)?;
        let out = self.change(|c| {
            let v = f(c)?;
            // A write, so that the commit syncs the log even when `f` changed nothing.
            c.tx.execute("UPDATE layer SET value = value WHERE key = 'format'", [])
                .map_err(db)?;
            Ok(v)
        });
        let reset = self
            .conn
            .execute_batch("PRAGMA synchronous=NORMAL")
            .map_err(db);
        let v = out?;
        reset?;
        self.unsynced = false;
        Ok(v)
    }
}

/// The changes of one transaction.
pub struct Changes<'a> {
    tx: &'a Transaction<'a>,
}

impl Changes<'_> {
    pub fn put_node(&self, n: &NodeRow) -> FsResult<()> {
        self.tx
            .prepare_cached(
                "INSERT OR REPLACE INTO nodes (id, parent, kind, mode, uid, gid, nlink, rdev,
                     atime, mtime, ctime, target, origin, materialized, size, lower_limit)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )
            .map_err(db)?
            .execute(params![
                i(n.id),
                i(n.parent),
                kind_code(n.kind),
                n.mode,
                n.uid,
                n.gid,
                n.nlink,
                i(n.rdev),
                nanos(n.atime),
                nanos(n.mtime),
                nanos(n.ctime),
                n.target,
                n.origin,
                n.materialized,
                i(n.size),
                i(n.lower_limit),
            ])
            .map_err(db)?;
        Ok(())
    }

    /// Forgets a node, its chunks and its listing.
    pub fn remove_node(&self, id: u64) -> FsResult<()> {
        for sql in [
            "DELETE FROM nodes WHERE id = ?1",
            "DELETE FROM chunks WHERE node = ?1",
            "DELETE FROM entries WHERE dir = ?1",
        ] {
            self.tx.execute(sql, [i(id)]).map_err(db)?;
        }
        Ok(())
    }

    pub fn put_entry(&self, dir: u64, name: &[u8], child: u64) -> FsResult<()> {
        self.tx
            .prepare_cached("INSERT OR REPLACE INTO entries (dir, name, child) VALUES (?1, ?2, ?3)")
            .map_err(db)?
            .execute(params![i(dir), name, i(child)])
            .map_err(db)?;
        Ok(())
    }

    pub fn remove_entry(&self, dir: u64, name: &[u8]) -> FsResult<()> {
        self.tx
            .prepare_cached("DELETE FROM entries WHERE dir = ?1 AND name = ?2")
            .map_err(db)?
            .execute(params![i(dir), name])
            .map_err(db)?;
        Ok(())
    }

    /// Records chunks as local.
    pub fn add_chunks(&self, node: u64, chunks: &[u64]) -> FsResult<()> {
        let mut st = self
            .tx
            .prepare_cached("INSERT OR IGNORE INTO chunks (node, chunk) VALUES (?1, ?2)")
            .map_err(db)?;
        for c in chunks {
            st.execute([i(node), i(*c)]).map_err(db)?;
        }
        Ok(())
    }

    /// Size, limit and times of a file; chunks at or past the limit no longer matter.
    pub fn put_content(
        &self,
        node: u64,
        size: u64,
        lower_limit: u64,
        times: [SystemTime; 3],
        chunk: u64,
    ) -> FsResult<()> {
        self.tx
            .prepare_cached(
                "UPDATE nodes SET size = ?2, lower_limit = ?3, atime = ?4, mtime = ?5,
                     ctime = ?6 WHERE id = ?1",
            )
            .map_err(db)?
            .execute(params![
                i(node),
                i(size),
                i(lower_limit),
                nanos(times[0]),
                nanos(times[1]),
                nanos(times[2])
            ])
            .map_err(db)?;
        self.tx
            .prepare_cached("DELETE FROM chunks WHERE node = ?1 AND chunk >= ?2")
            .map_err(db)?
            .execute([i(node), i(lower_limit.div_ceil(chunk))])
            .map_err(db)?;
        Ok(())
    }
}
