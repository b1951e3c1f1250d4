//! Read-only commands: `snapshots`, `ls`, `cat`, `diff`, `stats`.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use cairn_engine::snapshot::SnapshotKind;
use cairn_engine::tree::{Node, NodeKind};
use cairn_engine::walk::{self, Entry};
use chrono::{DateTime, Local};
use serde_json::json;

use crate::args::{Filter, Global};
use crate::exit;
use crate::format::{self, bytes};
use crate::open::Settings;

pub fn snapshots(s: &Settings, g: &Global, f: &Filter) -> Result<u8> {
    let repo = s.open()?;
    let filter = super::engine_filter(f);
    let list: Vec<_> = repo
        .snapshots()?
        .into_iter()
        .filter(|x| filter.matches(&x.manifest))
        .collect();
    let damaged = cairn_engine::damage::all(&repo)?;
    if g.json {
        format::print_json(&json!(list
            .iter()
            .map(|x| {
                let mut v = format::snapshot_json(x);
                if let (Some(o), Some(d)) = (v.as_object_mut(), damaged.get(&x.id)) {
                    o.insert("damage".into(), json!(d));
                }
                v
            })
            .collect::<Vec<_>>()));
        return Ok(exit::OK);
    }
    println!(
        "{:<8}  {:<19}  {:<12}  {:<6}  {:>10}  {:<12}  source",
        "id", "time", "host", "kind", "size", "tags"
    );
    for x in &list {
        let m = &x.manifest;
        let kind = match m.kind {
            SnapshotKind::Tree => "tree",
            SnapshotKind::Stream => "stream",
            SnapshotKind::Image => "image",
        };
        println!(
            "{:<8}  {:<19}  {:<12}  {:<6}  {:>10}  {:<12}  {}",
            x.id.short(),
            m.time.with_timezone(&Local).format("%Y-%m-%d %H:%M:%S"),
            m.host,
            kind,
            bytes(m.summary.total_bytes),
            m.tags.join(","),
            m.source_label()
        );
        if let Some(d) = damaged.get(&x.id) {
            println!(
                "          DAMAGED: {} blobs lost, {} paths not restorable whole (`repo check` lists them)",
                d.lost_blobs.len(),
                d.paths_total
            );
        }
    }
    if !g.quiet {
        println!("{} snapshots", list.len());
    }
    Ok(exit::OK)
}

fn type_char(k: NodeKind) -> char {
    match k {
        NodeKind::File => '-',
        NodeKind::Dir => 'd',
        NodeKind::Symlink => 'l',
        NodeKind::Fifo => 'p',
        NodeKind::Socket => 's',
        NodeKind::Chardev => 'c',
        NodeKind::Blockdev => 'b',
    }
}

fn mode_string(n: &Node) -> String {
    let mut s = String::new();
    s.push(type_char(n.kind));
    for shift in [6, 3, 0] {
        let bits = (n.mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn node_json(p: &Path, n: &Node) -> serde_json::Value {
    let mut v = json!({
        "path": format::json_path(p),
        "type": n.kind.as_str(),
        "size": n.size,
        "mode": n.mode,
        "uid": n.uid,
        "gid": n.gid,
        "user": n.user,
        "group": n.group,
        "mtime": DateTime::from_timestamp(n.mtime.sec, n.mtime.nsec).map(|t| t.to_rfc3339()),
        "inode": n.inode,
        "links": n.links,
    });
    if let (Some(t), Some(o)) = (&n.target, v.as_object_mut()) {
        o.insert("target".into(), json!(String::from_utf8_lossy(t)));
    }
    v
}

pub fn ls(
    s: &Settings,
    g: &Global,
    spec: &str,
    path: Option<&Path>,
    long: bool,
    f: &Filter,
) -> Result<u8> {
    let repo = s.open()?;
    let snap = super::find_snapshot(&repo, spec, f)?;
    let base = Path::new("/").join(path.unwrap_or(Path::new("/")));
    let entry = walk::resolve(&repo, &snap.manifest.root, &base)?;
    let mut out = std::io::stdout().lock();
    let mut items = Vec::new();
    let mut show = |p: &Path, n: &Node| -> Result<()> {
        if g.json {
            items.push(node_json(p, n));
        } else if long {
            let mtime = DateTime::from_timestamp(n.mtime.sec, n.mtime.nsec)
                .map(|t| {
                    t.with_timezone(&Local)
                        .format("%Y-%m-%d %H:%M:%S")
                        .to_string()
                })
                .unwrap_or_default();
            let mut line = format!(
                "{} {:>8} {:>8} {:>12} {} {}",
                mode_string(n),
                n.user.clone().unwrap_or_else(|| n.uid.to_string()),
                n.group.clone().unwrap_or_else(|| n.gid.to_string()),
                n.size,
                mtime,
                format::path(p)
            );
            if let Some(t) = &n.target {
                line.push_str(" -> ");
                line.push_str(&format::escape(t));
            }
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{}", format::path(p))?;
        }
        Ok(())
    };
    if let Entry::Node(n) = &entry {
        show(&base, n)?;
    }
    if let Some(tree) = entry.subtree() {
        walk::walk(&repo, &tree, &base, &mut |p, n| {
            show(p, n).map_err(|e| {
                cairn_engine::Error::io("stdout", std::io::Error::other(e.to_string()))
            })?;
            Ok(true)
        })?;
    }
    if g.json {
        format::print_json(&json!(items));
    }
    Ok(exit::OK)
}

pub fn cat(s: &Settings, spec: &str, path: Option<&Path>, f: &Filter) -> Result<u8> {
    let repo = s.open()?;
    let snap = super::find_snapshot(&repo, spec, f)?;
    let path = match (path, &snap.manifest.name) {
        (Some(p), _) => Path::new("/").join(p),
        (None, Some(name)) => Path::new("/").join(name),
        (None, None) => bail!(
            "snapshot {} holds file trees: name the file to print",
            snap.id.short()
        ),
    };
    let node = match walk::resolve(&repo, &snap.manifest.root, &path)? {
        Entry::Node(n) if n.kind == NodeKind::File => n,
        _ => bail!("{}: not a file", format::path(&path)),
    };
    let mut out = std::io::stdout().lock();
    let zeros = vec![0u8; 1 << 20];
    for e in &node.content {
        match e.blob {
            Some(id) => {
                let data = repo
                    .read_blob(&id)
                    .with_context(|| format!("reading {}", format::path(&path)))?;
                out.write_all(&data)?;
            }
            None => {
                let mut left = e.len;
                while left > 0 {
                    let n = left.min(zeros.len() as u64);
                    out.write_all(&zeros[..usize::try_from(n).unwrap_or(0)])?;
                    left -= n;
                }
            }
        }
    }
    out.flush()?;
    Ok(exit::OK)
}

pub fn diff(s: &Settings, g: &Global, a: &str, b: &str, f: &Filter) -> Result<u8> {
    let repo = s.open()?;
    let sa = super::find_snapshot(&repo, a, f)?;
    let sb = super::find_snapshot(&repo, b, f)?;
    let changes = cairn_engine::diff::diff(&repo, &sa.manifest.root, &sb.manifest.root)?;
    if g.json {
        format::print_json(&json!(changes
            .iter()
            .map(|c| json!({ "path": format::json_path(&c.path), "change": c.change }))
            .collect::<Vec<_>>()));
    } else {
        for c in &changes {
            println!("{}    {}", c.change.symbol(), format::path(&c.path));
        }
    }
    Ok(exit::OK)
}

pub fn stats(s: &Settings, g: &Global, spec: Option<&str>, f: &Filter) -> Result<u8> {
    let repo = s.open()?;
    if let Some(spec) = spec {
        let snap = super::find_snapshot(&repo, spec, f)?;
        if g.json {
            format::print_json(&format::snapshot_json(&snap));
        } else {
            let m = &snap.manifest.summary;
            println!(
                "snapshot {} ({})",
                snap.id.short(),
                snap.manifest.source_label()
            );
            println!(
                "  files {}  dirs {}  unchanged {}",
                m.files, m.dirs, m.files_unchanged
            );
            println!(
                "  size {}  read {}  new {}  stored {}",
                bytes(m.total_bytes),
                bytes(m.bytes_read),
                bytes(m.bytes_new),
                bytes(m.bytes_stored)
            );
            println!(
                "  errors {}  took {:.1}s",
                m.errors,
                m.duration_ms as f64 / 1000.0
            );
        }
        return Ok(exit::OK);
    }
    let snaps = repo.snapshots()?;
    let t = repo.index().totals()?;
    let logical: u64 = snaps.iter().map(|s| s.manifest.summary.total_bytes).sum();
    #[allow(clippy::cast_precision_loss)]
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    if g.json {
        format::print_json(&json!({
            "snapshots": snaps.len(),
            "packs": t.packs,
            "pack_bytes": t.pack_bytes,
            "blobs": t.blobs,
            "blob_copies": t.locations,
            "unique_bytes": t.raw_bytes,
            "stored_bytes": t.stored_bytes,
            "logical_bytes": logical,
            "dedup_ratio": ratio(logical, t.raw_bytes),
            "compression_ratio": ratio(t.raw_bytes, t.stored_bytes),
        }));
    } else {
        println!("repository {}", repo.location());
        println!("  snapshots      {}", snaps.len());
        println!("  logical size   {} (sum over snapshots)", bytes(logical));
        println!(
            "  unique data    {} in {} blobs (dedup x{:.2})",
            bytes(t.raw_bytes),
            t.blobs,
            ratio(logical, t.raw_bytes)
        );
        println!(
            "  stored         {} in {} packs (compression x{:.2})",
            bytes(t.pack_bytes),
            t.packs,
            ratio(t.raw_bytes, t.stored_bytes)
        );
    }
    Ok(exit::OK)
}
