//! Text output helpers: byte sizes, times, paths that may hold any bytes, and the JSON
//! shape of snapshots.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use cairn_engine::snapshot::Snapshot;
use serde_json::{json, Value};

/// Sizes in binary units: `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    #[allow(clippy::cast_precision_loss)]
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A path for a terminal: control characters and invalid UTF-8 escaped, so one entry
/// is always one line.
pub fn path(p: &Path) -> String {
    escape(p.as_os_str().as_bytes())
}

pub fn escape(raw: &[u8]) -> String {
    let mut out = String::new();
    for chunk in raw.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// A path for JSON: the UTF-8 text when valid, else lossy text plus the raw bytes in hex.
pub fn json_path(p: &Path) -> Value {
    let raw = p.as_os_str().as_bytes();
    match std::str::from_utf8(raw) {
        Ok(s) => json!(s),
        Err(_) => json!({ "lossy": String::from_utf8_lossy(raw), "hex": hex::encode(raw) }),
    }
}

pub fn snapshot_json(s: &Snapshot) -> Value {
    let m = &s.manifest;
    let mut v = json!({
        "id": s.id.to_hex(),
        "short_id": s.id.short(),
        "time": m.time.to_rfc3339(),
        "host": m.host,
        "user": m.user,
        "kind": m.kind,
        "tags": m.tags,
        "parent": m.parent.map(|p| p.to_hex()),
        "summary": m.summary,
    });
    if let Some(o) = v.as_object_mut() {
        match &m.name {
            Some(n) => o.insert("name".into(), json!(n)),
            None => o.insert("paths".into(), json!(m.paths)),
        };
        if !m.meta.is_empty() {
            o.insert("meta".into(), json!(m.meta));
        }
    }
    v
}

pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}
