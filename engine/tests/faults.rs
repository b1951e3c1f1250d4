//! The fault matrix: backup, forget + prune, repair and the format upgrade, each run
//! against every fault point of the storage on an in-memory filesystem ([`SimFs`]).
//!
//! A clean run records the operations it makes (file created, written, synced, renamed,
//! removed, listed, read). Then the same run is repeated once per operation and per
//! effect: the power goes at that operation (only what was fsynced survives), it fails
//! with `EIO`, or the disk is full from then on (`ENOSPC`). After each:
//! - the repository opens (with the index rebuilt from the packs);
//! - `check --read-data` finds no problem (but the damage a case planted on purpose);
//! - every snapshot that must survive is there, no unknown snapshot is, and every
//!   snapshot there restores byte for byte to what was backed up;
//! - a run that reported success kept what it committed.
//!
//! Errors are checked in the state the process saw (the next command runs on it) and
//! after a power loss right then (what the disk had made durable).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use cairn_engine::check::{check, CheckOptions};
use cairn_engine::crypto::Encryption;
use cairn_engine::id::SnapshotId;
use cairn_engine::lock::LockKind;
use cairn_engine::progress::Progress;
use cairn_engine::prune::{prune, PruneOptions};
use cairn_engine::repair::{repair, RepairOptions};
use cairn_engine::store::sim::{Effect, Fault, Op, SimFs};
use cairn_engine::Repository;
use common::{open, random_files, restores_to, sim_repo, small_config, Files, Rng, Source};

/// What a faulted run reported.
type RunResult = Result<Option<SnapshotId>, String>;

/// One operation under test and what must hold after it, whatever happened.
struct Case {
    name: &'static str,
    base: SimFs,
    source: Source,
    /// Every snapshot that may be in the repository, with its content.
    known: HashMap<SnapshotId, Files>,
    /// What a snapshot made by the run holds (a backup's source).
    made: Option<Files>,
    /// Snapshots that must be there after any run.
    kept: Vec<SnapshotId>,
    /// Objects (`pack <id>`, `blob <id>`) whose problems the case planted on purpose,
    /// and the files that cannot restore because of them.
    damaged: Vec<String>,
    lost_files: Vec<String>,
    /// The snapshot a forget removes.
    forget: Option<SnapshotId>,
    op: fn(&Case, &SimFs) -> RunResult,
}

fn backup_op(case: &Case, fs: &SimFs) -> RunResult {
    let repo = open(fs).map_err(|e| e.to_string())?;
    case.source
        .backup(&repo)
        .map(|s| Some(s.id))
        .map_err(|e| e.to_string())
}

/// Forgets the case's snapshot, then prunes everything unused (repacking every pack
/// with unused data).
fn forget_prune_op(case: &Case, fs: &SimFs) -> RunResult {
    let repo = open(fs).map_err(|e| e.to_string())?;
    repo.lock(LockKind::Shared, "forget", Duration::ZERO)
        .map_err(|e| e.to_string())?;
    if let Some(id) = case.forget {
        repo.remove_snapshot(&id).map_err(|e| e.to_string())?;
    }
    prune(&repo, &prune_all()).map_err(|e| e.to_string())?;
    Ok(None)
}

fn prune_all() -> PruneOptions {
    PruneOptions {
        max_unused: 0.0,
        grace: Duration::ZERO,
        dry_run: false,
        lock_wait: Duration::ZERO,
    }
}

fn repair_op(_case: &Case, fs: &SimFs) -> RunResult {
    let repo = open(fs).map_err(|e| e.to_string())?;
    repair(
        &repo,
        &RepairOptions {
            read_data: true,
            lock_wait: Duration::ZERO,
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(None)
}

fn upgrade_op(_case: &Case, fs: &SimFs) -> RunResult {
    let mut repo = open(fs).map_err(|e| e.to_string())?;
    repo.lock(LockKind::Exclusive, "upgrade", Duration::ZERO)
        .map_err(|e| e.to_string())?;
    repo.upgrade_format().map_err(|e| e.to_string())?;
    Ok(None)
}

/// Checks everything the module docs promise of the repository on `fs` after `result`.
fn verify(case: &Case, fs: &SimFs, result: &RunResult) -> Result<(), String> {
    let repo = open(fs).map_err(|e| format!("the repository does not open: {e}"))?;
    let report = check(
        &repo,
        &CheckOptions {
            read_data: true,
            subset: None,
        },
        &Progress::default(),
    )
    .map_err(|e| format!("check failed to run: {e}"))?;
    let unexpected: Vec<_> = report
        .problems
        .iter()
        .filter(|p| !case.damaged.iter().any(|d| p.object.contains(d.as_str())))
        .collect();
    if !unexpected.is_empty() {
        return Err(format!("check found problems: {unexpected:?}"));
    }
    let present: Vec<_> = repo.snapshots().map_err(|e| e.to_string())?;
    for id in &case.kept {
        if !present.iter().any(|s| s.id == *id) {
            return Err(format!("snapshot {id} is gone"));
        }
    }
    if let Ok(Some(id)) = result {
        if !present.iter().any(|s| s.id == *id) {
            return Err(format!("snapshot {id} was reported made, and is gone"));
        }
    }
    for snap in &present {
        let want = match (case.known.get(&snap.id), &case.made) {
            (Some(w), _) => w,
            (None, Some(made)) => made,
            (None, None) => return Err(format!("unknown snapshot {}", snap.id)),
        };
        restores_to(&repo, snap, &case.source.dir, want, &case.lost_files)
            .map_err(|e| format!("snapshot {}: {e}", snap.id))?;
    }
    if report.problems.is_empty() && !case.lost_files.is_empty() {
        // The planted damage was repaired away: the lost files must be reported lost by
        // repair's marks, never restored wrong (restores_to compared the rest).
    }
    Ok(())
}

/// The faults to try at the `k`-th operation, of kind `op`, `nth` of its kind.
fn faults_at(k: u64, op: Op, nth: u64) -> Vec<Fault> {
    let mut out = vec![Fault {
        op: None,
        nth: k,
        effect: Effect::Fail {
            errno: libc::EIO,
            sticky: false,
        },
    }];
    if op.changes() {
        out.push(Fault {
            op: None,
            nth: k,
            effect: Effect::PowerLoss,
        });
    }
    if matches!(op, Op::Create | Op::Write | Op::Sync | Op::Mkdir) {
        out.push(Fault {
            op: Some(op),
            nth,
            effect: Effect::Fail {
                errno: libc::ENOSPC,
                sticky: true,
            },
        });
    }
    out
}

#[derive(Debug, Default)]
struct Tally {
    points: u64,
    runs: u64,
    failed_runs: u64,
}

/// Runs `case` clean, then once per fault; panics with every violation found.
fn run_matrix(case: &Case) -> Tally {
    let clean = case.base.fork();
    clean.record();
    let result = (case.op)(case, &clean);
    assert!(
        result.is_ok(),
        "{}: the clean run failed: {result:?}",
        case.name
    );
    let log = clean.recorded();
    verify(case, &case.base.fork(), &Ok(None))
        .unwrap_or_else(|e| panic!("{}: the base: {e}", case.name));
    verify(case, &clean.fork(), &result)
        .unwrap_or_else(|e| panic!("{}: clean run: {e}", case.name));

    let mut runs: Vec<Fault> = Vec::new();
    let mut seen: HashMap<Op, u64> = HashMap::new();
    for (k, op) in log.iter().enumerate() {
        let nth = seen.entry(*op).or_default();
        runs.extend(faults_at(k as u64, *op, *nth));
        *nth += 1;
    }
    let next = AtomicU64::new(0);
    let failed_runs = AtomicU64::new(0);
    let violations: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(fault) = runs.get(i) else { break };
                let fs = case.base.fork();
                fs.inject(*fault);
                let result = (case.op)(case, &fs);
                if result.is_err() {
                    failed_runs.fetch_add(1, Ordering::Relaxed);
                }
                if !fs.changed() {
                    // Nothing was changed: the state is the base, verified already.
                    continue;
                }
                let states: Vec<(&str, SimFs)> = match fault.effect {
                    Effect::PowerLoss => vec![("after the power loss", fs.power_loss())],
                    Effect::Fail { .. } => vec![
                        ("as the process left it", fs.fork()),
                        ("after a power loss then", fs.power_loss()),
                    ],
                };
                for (when, state) in states {
                    if let Err(e) = verify(case, &state, &result) {
                        violations.lock().unwrap().push(format!(
                            "{}: {fault:?} (run said {result:?}), {when}: {e}",
                            case.name
                        ));
                    }
                }
            });
        }
    });
    let violations = violations.into_inner().unwrap();
    assert!(
        violations.is_empty(),
        "{} of {} faulted runs broke the repository:\n{}",
        violations.len(),
        runs.len(),
        violations[..violations.len().min(20)].join("\n")
    );
    let tally = Tally {
        points: log.len() as u64,
        runs: runs.len() as u64,
        failed_runs: failed_runs.into_inner(),
    };
    eprintln!(
        "{}: {} fault points, {} faulted runs ({} of them failed cleanly), 0 snapshots lost",
        case.name, tally.points, tally.runs, tally.failed_runs
    );
    tally
}

/// A repository with snapshots of `versions` of one source (oldest first), on a fresh
/// simulated filesystem; the source is left holding `then`.
fn with_snapshots(
    config: cairn_engine::config::Config,
    versions: &[Files],
    then: &Files,
) -> (SimFs, Source, HashMap<SnapshotId, Files>, Vec<SnapshotId>) {
    let (fs, repo) = sim_repo(config);
    let source = Source::new();
    let mut known = HashMap::new();
    let mut order = Vec::new();
    for v in versions {
        source.set(v);
        let snap = source.backup(&repo).unwrap();
        known.insert(snap.id, v.clone());
        order.push(snap.id);
    }
    drop(repo);
    source.set(then);
    (fs, source, known, order)
}

/// B from A: some files changed, one removed, one added.
fn next_version(rng: &mut Rng, a: &Files) -> Files {
    let mut b = a.clone();
    let keys: Vec<String> = b.keys().cloned().collect();
    for k in keys.iter().step_by(3) {
        let len = b[k].len().max(1);
        b.insert(k.clone(), rng.bytes(len));
    }
    b.remove(&keys[1]);
    b.insert(format!("new{}", rng.below(1000)), rng.bytes(40_000));
    b
}

fn cases(encryption: Encryption) -> Vec<Case> {
    let mut rng = Rng(0x5EED_F417 ^ encryption as u64);
    let a = random_files(&mut rng, 8, 300_000);
    let b = next_version(&mut rng, &a);
    let c = next_version(&mut rng, &b);
    let mut out = Vec::new();

    let (base, source, known, _) = with_snapshots(small_config(encryption), &[], &a);
    out.push(Case {
        name: "first backup",
        base,
        source,
        known,
        made: Some(a.clone()),
        kept: Vec::new(),
        damaged: Vec::new(),
        lost_files: Vec::new(),
        forget: None,
        op: backup_op,
    });

    let (base, source, known, order) =
        with_snapshots(small_config(encryption), std::slice::from_ref(&a), &b);
    out.push(Case {
        name: "incremental backup",
        base,
        source,
        known,
        made: Some(b.clone()),
        kept: order,
        damaged: Vec::new(),
        lost_files: Vec::new(),
        forget: None,
        op: backup_op,
    });

    let (base, source, known, order) = with_snapshots(
        small_config(encryption),
        &[a.clone(), b.clone(), c.clone()],
        &c,
    );
    out.push(Case {
        name: "forget + prune",
        base,
        source,
        known,
        made: None,
        kept: order[1..].to_vec(),
        damaged: Vec::new(),
        lost_files: Vec::new(),
        forget: Some(order[0]),
        op: forget_prune_op,
    });

    let (base, source, known, order) =
        with_snapshots(small_config(encryption), &[a.clone(), b.clone()], &b);
    let (damaged, lost_files) = damage_one_blob(&base, &source.dir);
    out.push(Case {
        name: "repair",
        base,
        source,
        known,
        made: None,
        kept: order,
        damaged,
        lost_files,
        forget: None,
        op: repair_op,
    });

    let mut v1 = small_config(encryption);
    v1.version = 1;
    let (base, source, known, order) = with_snapshots(v1, &[a.clone(), b.clone()], &b);
    out.push(Case {
        name: "format upgrade",
        base,
        source,
        known,
        made: None,
        kept: order,
        damaged: Vec::new(),
        lost_files: Vec::new(),
        forget: None,
        op: upgrade_op,
    });
    out
}

/// Flips a byte inside one data blob of one pack, durably; returns the objects the
/// damage is reported against (the pack and the blob) and the files that need it.
fn damage_one_blob(fs: &SimFs, src: &std::path::Path) -> (Vec<String>, Vec<String>) {
    let repo = open(fs).unwrap();
    let (pack, entry) = {
        let snaps = repo.snapshots().unwrap();
        let mut found = None;
        cairn_engine::walk::walk(
            &repo,
            &snaps[0].manifest.root,
            std::path::Path::new("/"),
            &mut |_, n| {
                if found.is_none() {
                    if let Some(b) = n.content_blobs().next() {
                        found = Some(b);
                    }
                }
                Ok(true)
            },
        )
        .unwrap();
        let blob = found.unwrap();
        let loc = repo.locate(&blob).unwrap();
        let entry = repo
            .index()
            .pack_rows(&loc.pack)
            .unwrap()
            .into_iter()
            .find(|(_, e)| e.id == blob)
            .unwrap()
            .1;
        (loc.pack, entry)
    };
    let hex = pack.to_hex();
    let path = PathBuf::from(common::ROOT)
        .join("data")
        .join(&hex[..2])
        .join(&hex);
    let mut bytes = fs.files_under(&path).into_iter().next().unwrap().1;
    bytes[entry.offset as usize + entry.length as usize / 2] ^= 0x40;
    fs.tamper(&path, bytes).unwrap();
    let report = check(
        &repo,
        &CheckOptions {
            read_data: true,
            subset: None,
        },
        &Progress::default(),
    )
    .unwrap();
    let mut lost = Vec::new();
    for a in &report.affected {
        let rel = a
            .path
            .strip_prefix(src)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        if !lost.contains(&rel) {
            lost.push(rel);
        }
    }
    assert!(!lost.is_empty(), "the damage hit no file: {report:?}");
    (
        vec![format!("pack {pack}"), format!("blob {}", entry.id)],
        lost,
    )
}

#[test]
fn every_fault_point_of_backup_prune_repair_and_upgrade_loses_nothing() {
    let mut total = Tally::default();
    for encryption in [Encryption::Aes256Gcm, Encryption::None] {
        for case in cases(encryption) {
            let t = run_matrix(&case);
            total.points += t.points;
            total.runs += t.runs;
            total.failed_runs += t.failed_runs;
        }
    }
    eprintln!(
        "fault matrix: {} fault points, {} faulted runs ({} failed cleanly), 0 snapshots lost",
        total.points, total.runs, total.failed_runs
    );
}

/// The reproduction of the issue: a prune on a disk that fills up while it rewrites
/// packs. Whatever the free space, it loses nothing, and when it could not write it
/// fails saying the disk is full.
#[test]
fn a_prune_that_fills_the_disk_fails_and_loses_nothing() {
    let mut rng = Rng(0xD15C_F011);
    let a = random_files(&mut rng, 12, 300_000);
    // Every other file goes: every pack is half used, and is rewritten.
    let b: Files = a
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(_, (k, v))| (k.clone(), v.clone()))
        .collect();
    for encryption in [Encryption::Aes256Gcm, Encryption::None] {
        let (base, source, known, order) =
            with_snapshots(small_config(encryption), &[a.clone(), b.clone()], &b);
        let case = Case {
            name: "prune on a full disk",
            base,
            source,
            known,
            made: None,
            kept: order[1..].to_vec(),
            damaged: Vec::new(),
            lost_files: Vec::new(),
            forget: Some(order[0]),
            op: forget_prune_op,
        };
        let clean = case.base.fork();
        let before = clean.used_bytes();
        (case.op)(&case, &clean).unwrap();
        let mut full = 0;
        let mut step = 0;
        while step < 3 << 20 {
            let fs = case.base.fork();
            fs.set_capacity(Some(before + step));
            let result = (case.op)(&case, &fs);
            if let Err(e) = &result {
                assert!(
                    e.contains("disk") && e.contains("full"),
                    "capacity +{step}: {e}"
                );
                full += 1;
            }
            fs.set_capacity(None);
            verify(&case, &fs.fork(), &result)
                .unwrap_or_else(|e| panic!("capacity +{step} ({result:?}): {e}"));
            // Freed space, prune again: it finishes the job.
            let again = (case.op)(&case, &fs);
            verify(&case, &fs.fork(), &again).unwrap();
            step += 64 << 10;
        }
        assert!(full > 5, "only {full} runs filled the disk");
    }
}

/// A repository whose prune fails must still be the repository it was: this is what
/// the old saver broke (a copy lost with a shared pack, its original deleted).
#[test]
fn a_saver_that_lost_a_pack_refuses_everything_after_and_names_what_it_lost() {
    use cairn_engine::blob::BlobKind;
    use cairn_engine::saver::BlobSaver;
    let (fs, repo): (SimFs, Repository) = sim_repo(small_config(Encryption::Aes256Gcm));
    let saver = BlobSaver::new(&repo);
    let mut rng = Rng(7);
    let first = rng.bytes(100_000);
    let (first_id, _) = saver.save(BlobKind::Data, &first).unwrap();
    // The pack is lost at its commit: its fsync fails (counts start now).
    fs.reset_faults();
    fs.inject(Fault {
        op: Some(Op::Sync),
        nth: 0,
        effect: Effect::Fail {
            errno: libc::ENOSPC,
            sticky: false,
        },
    });
    let mut err = None;
    for _ in 0..20 {
        if let Err(e) = saver.save(BlobKind::Data, &rng.bytes(100_000)) {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("a pack was committed, and its sync failed");
    assert!(err.to_string().contains("lost with it"), "{err}");
    assert!(saver.lost_blobs().contains(&first_id));
    // Fail-stop: nothing more is saved, not even what dedup would answer from memory,
    // and the flush that a commit needs fails.
    let again = saver.save(BlobKind::Data, &first).unwrap_err();
    assert!(
        again.to_string().contains("nothing more is saved"),
        "{again}"
    );
    assert!(saver.flush().is_err());
    assert!(!repo.index().contains(&first_id).unwrap());
}
