//! Any single mutation of any repository file (a bit flipped, the file truncated,
//! extended, overwritten with garbage, or a length field made huge) gives a clear error
//! or a result that is right where the data is intact: never a panic, never a hang, and
//! never a success with wrong bytes. In encrypted and unencrypted repositories alike,
//! for every operation that reads: open, list snapshots, walk a tree (`ls`), read a
//! file (`cat`), diff, restore, and check.
//!
//! "Right where the data is intact": a restore that reports no problem restored every
//! file byte for byte; one that reports problems restored every other file byte for
//! byte; a check that finds nothing wrong comes with restores that found nothing wrong.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use cairn_engine::check::{check, CheckOptions};
use cairn_engine::crypto::Encryption;
use cairn_engine::id::SnapshotId;
use cairn_engine::progress::Progress;
use cairn_engine::restore::{restore, RestoreOptions};
use cairn_engine::store::sim::SimFs;
use cairn_engine::tree::NodeKind;
use cairn_engine::walk;
use common::{open, random_files, sim_repo, small_config, Files, Rng, Source};
use proptest::prelude::*;

/// A repository with two snapshots (the second a change of the first), a stale lock,
/// and what each snapshot holds.
struct Base {
    fs: SimFs,
    source: Source,
    known: HashMap<SnapshotId, Files>,
    files: Vec<PathBuf>,
}

fn base(encryption: Encryption) -> Base {
    let mut rng = Rng(0xB17_F11B ^ encryption as u64);
    let (fs, repo) = sim_repo(small_config(encryption));
    let source = Source::new();
    let a = random_files(&mut rng, 5, 150_000);
    let mut b = a.clone();
    b.insert("d0/changed".into(), rng.bytes(70_000));
    let mut known = HashMap::new();
    for v in [&a, &b] {
        source.set(v);
        known.insert(source.backup(&repo).unwrap().id, v.clone());
    }
    let lock = serde_json::json!({
        "version": 1, "kind": "shared", "operation": "backup", "host": "elsewhere",
        "user": "u", "pid": 1, "created": "2026-01-01T00:00:00Z",
        "refreshed": "2026-01-01T00:00:00Z",
    });
    repo.backend()
        .write(
            cairn_engine::store::FileKind::Lock,
            &"f".repeat(64),
            lock.to_string().as_bytes(),
        )
        .unwrap();
    drop(repo);
    let files = fs
        .files_under(Path::new(common::ROOT))
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    Base {
        fs,
        source,
        known,
        files,
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Truncate {
        to: usize,
    },
    Extend {
        by: Vec<u8>,
    },
    Garbage {
        at: usize,
        bytes: Vec<u8>,
    },
    /// A little-endian u32 or u64 field of all ones at `at` (lengths, offsets, counts).
    Huge {
        at: usize,
        wide: bool,
    },
}

impl Mutation {
    /// Applies the mutation to `content`; positions are taken modulo its length.
    fn apply(&self, content: &mut Vec<u8>) {
        let len = content.len().max(1);
        match self {
            Self::Flip { at, bit } => {
                if !content.is_empty() {
                    content[at % len] ^= 1 << (bit % 8);
                }
            }
            Self::Truncate { to } => content.truncate(to % len),
            Self::Extend { by } => content.extend_from_slice(by),
            Self::Garbage { at, bytes } => {
                let start = at % len;
                for (i, b) in bytes.iter().enumerate() {
                    match content.get_mut(start + i) {
                        Some(c) => *c = *b,
                        None => content.push(*b),
                    }
                }
            }
            Self::Huge { at, wide } => {
                let n = if *wide { 8 } else { 4 };
                let start = (at % len) & !3;
                for i in start..start + n {
                    match content.get_mut(i) {
                        Some(c) => *c = 0xff,
                        None => content.push(0xff),
                    }
                }
            }
        }
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        any::<usize>().prop_map(|to| Mutation::Truncate { to }),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(|by| Mutation::Extend { by }),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..32)
        )
            .prop_map(|(at, bytes)| Mutation::Garbage { at, bytes }),
        (any::<usize>(), any::<bool>()).prop_map(|(at, wide)| Mutation::Huge { at, wide }),
    ]
}

/// Runs `f` on another thread; a panic or a run over `limit` fails with a message.
fn guarded<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => {
            let _ = handle.join();
            Ok(v)
        }
        Ok(Err(p)) => Err(format!(
            "{what} panicked: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default()
        )),
        Err(_) => Err(format!("{what} did not finish within {limit:?}: a hang")),
    }
}

/// Every reading operation on the mutated repository, checked as the module docs say.
fn read_everything(
    fs: SimFs,
    src: PathBuf,
    known: HashMap<SnapshotId, Files>,
) -> Result<(), String> {
    let repo = match open(&fs) {
        Ok(r) => r,
        Err(e) => return clear(&e),
    };
    let snaps = match repo.snapshots() {
        Ok(s) => s,
        Err(e) => return clear(&e),
    };
    let mut all_clean = true;
    for snap in &snaps {
        let want = known
            .get(&snap.id)
            .ok_or_else(|| format!("a snapshot that was never made appeared: {}", snap.id))?;
        // ls: a walk of the whole tree.
        if let Err(e) = walk::walk(&repo, &snap.manifest.root, Path::new("/"), &mut |_, _| {
            Ok(true)
        }) {
            clear(&e)?;
            all_clean = false;
        }
        // cat: every file, through read_blob, is what was backed up or an error.
        let base = src.strip_prefix("/").unwrap().to_path_buf();
        for (rel, data) in want {
            let path = Path::new("/").join(&base).join(rel);
            let node = match walk::resolve(&repo, &snap.manifest.root, &path) {
                Ok(walk::Entry::Node(n)) if n.kind == NodeKind::File => n,
                Ok(_) => return Err(format!("{rel} is not a file in {}", snap.id)),
                Err(e) => {
                    clear(&e)?;
                    all_clean = false;
                    continue;
                }
            };
            let mut got = Vec::new();
            let mut failed = false;
            for e in &node.content {
                match e.blob {
                    Some(b) => match repo.read_blob(&b) {
                        Ok(d) => got.extend(d),
                        Err(err) => {
                            clear(&err)?;
                            failed = true;
                            break;
                        }
                    },
                    None => got.resize(got.len() + e.len as usize, 0),
                }
            }
            if failed {
                all_clean = false;
            } else if got != *data {
                return Err(format!("cat of {rel} gave wrong bytes, and no error"));
            }
        }
        // restore: what it restores without a problem is exact.
        let target = tempfile::tempdir().unwrap();
        let outcome = restore(
            &repo,
            snap,
            &RestoreOptions {
                target: target.path().to_owned(),
                includes: Vec::new(),
                threads: 2,
                no_sync: true,
            },
            &Progress::default(),
        );
        match outcome {
            Err(e) => {
                clear(&e)?;
                all_clean = false;
            }
            Ok(out) => {
                if !out.warnings.is_empty() {
                    all_clean = false;
                }
                for (rel, data) in want {
                    let p = target.path().join(&base).join(rel);
                    // Only a file a warning names (itself or a directory above it) may
                    // be missing or incomplete.
                    let in_snapshot = Path::new("/").join(&base).join(rel);
                    let warned = out
                        .warnings
                        .iter()
                        .any(|w| in_snapshot.starts_with(&w.path));
                    match std::fs::read(&p) {
                        Ok(got) if got == *data => {}
                        _ if warned => {}
                        Ok(_) => {
                            return Err(format!(
                                "restore wrote wrong bytes to {rel}, and no warning names it: {:?}",
                                out.warnings
                            ))
                        }
                        Err(_) => {
                            return Err(format!(
                                "restore left out {rel}, and no warning names it: {:?}",
                                out.warnings
                            ))
                        }
                    }
                }
            }
        }
    }
    if snaps.len() == 2 {
        if let Err(e) =
            cairn_engine::diff::diff(&repo, &snaps[0].manifest.root, &snaps[1].manifest.root)
        {
            clear(&e)?;
            all_clean = false;
        }
    }
    match check(
        &repo,
        &CheckOptions {
            read_data: true,
            subset: None,
        },
        &Progress::default(),
    ) {
        Err(e) => clear(&e)?,
        Ok(report) => {
            if report.ok() && (!all_clean || snaps.len() != known.len()) {
                return Err(format!(
                    "check found nothing wrong, yet {} of {} snapshots listed and reads failed: {}",
                    snaps.len(),
                    known.len(),
                    !all_clean
                ));
            }
        }
    }
    Ok(())
}

/// An error is clear when it says something.
fn clear(e: &cairn_engine::Error) -> Result<(), String> {
    if e.to_string().trim().is_empty() {
        return Err(format!("an empty error message: {e:?}"));
    }
    Ok(())
}

fn run_case(b: &Base, file: usize, m: &Mutation) -> Result<(), String> {
    let path = &b.files[file % b.files.len()];
    let fs = b.fs.fork();
    let mut content = fs
        .files_under(path)
        .into_iter()
        .next()
        .map(|(_, c)| c)
        .unwrap_or_default();
    m.apply(&mut content);
    fs.tamper(path, content).unwrap();
    let (src, known) = (b.source.dir.clone(), b.known.clone());
    guarded(
        "reading the mutated repository",
        Duration::from_secs(60),
        move || read_everything(fs, src, known),
    )?
    .map_err(|e| format!("{} after {m:?}: {e}", path.display()))
}

fn bases() -> &'static [Base; 2] {
    static B: std::sync::OnceLock<[Base; 2]> = std::sync::OnceLock::new();
    B.get_or_init(|| [base(Encryption::Aes256Gcm), base(Encryption::None)])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn a_single_mutation_of_any_file_gives_an_error_or_the_right_bytes(
        encrypted in any::<bool>(),
        file in any::<usize>(),
        m in mutation(),
    ) {
        let b = &bases()[usize::from(!encrypted)];
        if let Err(e) = run_case(b, file, &m) {
            prop_assert!(false, "{}", e);
        }
    }
}

/// Every file of both repositories, each mutation kind at a few places: the sweep a
/// random sample might miss.
#[test]
fn every_file_takes_every_kind_of_mutation() {
    for b in bases() {
        for file in 0..b.files.len() {
            for m in [
                Mutation::Flip { at: 0, bit: 0 },
                Mutation::Flip { at: 12, bit: 3 },
                Mutation::Flip {
                    at: usize::MAX / 2,
                    bit: 7,
                },
                Mutation::Truncate { to: 0 },
                Mutation::Truncate {
                    to: usize::MAX - 13,
                },
                Mutation::Extend { by: vec![0; 17] },
                Mutation::Garbage {
                    at: 8,
                    bytes: vec![0xa5; 24],
                },
                Mutation::Huge { at: 8, wide: false },
                Mutation::Huge {
                    at: usize::MAX - 11,
                    wide: true,
                },
            ] {
                run_case(b, file, &m).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}
