//! Verifying a file backup by restoring part of it: a random sample of the snapshot's
//! files restored into a scratch directory, each read back from the disk and checked
//! against what the snapshot recorded: its size, and every extent's bytes hashing to the
//! extent's blob id (holes reading as zeros). End to end, from the packs through
//! decryption, decompression and the restore's writes to the bytes on the disk; cheaper
//! than `check --read-data` because it reads a sample only.
//!
//! A file larger than [`WHOLE_FILE_LIMIT`] (a disk image) is not restored whole: a
//! sample of its extents is read from the repository and hashed instead.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use cairn_engine::progress::Progress;
use cairn_engine::restore::{self, RestoreOptions};
use cairn_engine::snapshot::Snapshot;
use cairn_engine::tree::{Node, NodeKind};
use cairn_engine::Repository;

use super::{Kind, Outcome, Recorder, Results, SnapshotRef, StepResult, Verification, VerifyError};

/// Files up to this size are restored whole; larger ones have their extents sampled.
pub const WHOLE_FILE_LIMIT: u64 = 256 << 20;

pub struct FilesVerifyRequest<'a> {
    pub repo: &'a Repository,
    pub snapshot: &'a Snapshot,
    pub repository: String,
    /// The share of files (and of a large file's extents) checked, 0 < share <= 1.
    pub share: f64,
    /// Where the scratch directory is made (it is removed after).
    pub scratch: PathBuf,
    pub trigger: String,
}

struct Picked {
    path: PathBuf,
    node: Node,
}

/// Verifies a sample of a snapshot's files; its record (a failure is a result).
pub fn run(results: &Results, req: &FilesVerifyRequest<'_>) -> Result<Verification, VerifyError> {
    if !(req.share > 0.0 && req.share <= 1.0) {
        return Err(VerifyError::Setup(format!(
            "the sample is a share of the files, more than 0% and at most 100% (not {:.1}%)",
            req.share * 100.0
        )));
    }
    let snap = SnapshotRef::of(req.snapshot, &req.repository);
    let mut r = Recorder::begin(
        results,
        Verification::new(Kind::Files, "files", &snap, &req.trigger),
    )?;
    let mut rng = Rng::seeded();
    let mut picked = Vec::new();
    let sampled = r.step("sample", |_| match sample(req, &mut rng) {
        Ok((p, total)) => {
            let bytes: u64 = p.iter().map(|f: &Picked| f.node.size).sum();
            let detail = format!("{} of {total} files ({bytes} bytes)", p.len());
            picked = p;
            (StepResult::Passed, detail)
        }
        Err(e) => (StepResult::Failed, e),
    });
    let scratch = req.scratch.join(format!("cairn-verify-{}", r.id()));
    let mut made = false;
    if sampled {
        let (whole, large): (Vec<&Picked>, Vec<&Picked>) =
            picked.iter().partition(|p| p.node.size <= WHOLE_FILE_LIMIT);
        let restored = r.step("restore", |_| {
            made = true;
            restore_sample(req, &whole, &scratch)
        });
        if restored {
            r.step("compare", |r| compare(r, req.repo, &whole, &scratch));
        } else {
            r.skip(&["compare"]);
        }
        if !large.is_empty() {
            r.step("large files", |_| sample_extents(req, &large, &mut rng));
        }
    }
    let cleaned = !made
        || r.step("cleanup", |_| match std::fs::remove_dir_all(&scratch) {
            Ok(()) => (StepResult::Passed, format!("{} removed", scratch.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (StepResult::Passed, "nothing to remove".into())
            }
            Err(e) => (StepResult::Failed, format!("{}: {e}", scratch.display())),
        });
    Ok(r.finish(cleaned))
}

/// The files of the snapshot, and a random share of them (at least one).
fn sample(req: &FilesVerifyRequest<'_>, rng: &mut Rng) -> Result<(Vec<Picked>, usize), String> {
    let pool = cairn_engine::threads::io_pool(0, "verify", 0).map_err(|e| e.to_string())?;
    let keep = |_: &Path, _: &Node| true;
    let make =
        |path: PathBuf, node: Node| (node.kind == NodeKind::File).then_some(Picked { path, node });
    let mut files: Vec<Picked> = pool
        .install(|| {
            cairn_engine::walk::collect(
                req.repo,
                &req.snapshot.manifest.root,
                Path::new("/"),
                &keep,
                &make,
            )
        })
        .map_err(|e| e.to_string())?
        .into_iter()
        .flatten()
        .collect();
    let total = files.len();
    if total == 0 {
        return Err("the snapshot holds no files".into());
    }
    let want = share_of(total, req.share);
    rng.shuffle(&mut files);
    files.truncate(want);
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((files, total))
}

/// How many of `n` a share is: rounded up, at least one.
fn share_of(n: usize, share: f64) -> usize {
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let k = (n as f64 * share).ceil() as usize;
    k.clamp(1, n)
}

fn restore_sample(req: &FilesVerifyRequest<'_>, files: &[&Picked], scratch: &Path) -> Outcome {
    if files.is_empty() {
        return (
            StepResult::Passed,
            "no file small enough to restore whole".into(),
        );
    }
    let opts = RestoreOptions {
        target: scratch.to_owned(),
        includes: files.iter().map(|f| f.path.clone()).collect(),
        threads: 0,
        no_sync: false,
    };
    match restore::restore(req.repo, req.snapshot, &opts, &Progress::default()) {
        Ok(out) if out.warnings.is_empty() => (
            StepResult::Passed,
            format!(
                "{} files, {} bytes into {}",
                out.files,
                out.bytes,
                scratch.display()
            ),
        ),
        Ok(out) => (
            StepResult::Failed,
            out.warnings
                .iter()
                .take(10)
                .map(|w| format!("{}: {}", w.path.display(), w.message))
                .collect::<Vec<_>>()
                .join("; "),
        ),
        Err(e) => (StepResult::Failed, e.to_string()),
    }
}

/// Reads each restored file back and checks its size and every extent's hash.
fn compare(r: &mut Recorder<'_>, repo: &Repository, files: &[&Picked], scratch: &Path) -> Outcome {
    let mut bad = Vec::new();
    let mut bytes = 0u64;
    for f in files {
        let on_disk = scratch.join(f.path.strip_prefix("/").unwrap_or(&f.path));
        match compare_file(repo, &f.node, &on_disk) {
            Ok(()) => bytes += f.node.size,
            Err(e) => bad.push(format!("{}: {e}", f.path.display())),
        }
    }
    for b in &bad {
        r.log(&format!("differs: {b}"));
    }
    if bad.is_empty() {
        (
            StepResult::Passed,
            format!("{} files, {bytes} bytes, as recorded", files.len()),
        )
    } else {
        (
            StepResult::Failed,
            format!(
                "{} of {} files differ: {}",
                bad.len(),
                files.len(),
                bad.join("; ")
            ),
        )
    }
}

fn compare_file(repo: &Repository, node: &Node, path: &Path) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("not restored: {e}"))?;
    if meta.len() != node.size {
        return Err(format!(
            "{} bytes, the snapshot recorded {}",
            meta.len(),
            node.size
        ));
    }
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let mut at = 0u64;
    let mut buf = Vec::new();
    for ext in &node.content {
        let len = usize::try_from(ext.len).map_err(|_| "an extent too large".to_owned())?;
        buf.resize(len, 0);
        file.read_exact(&mut buf)
            .map_err(|e| format!("reading at byte {at}: {e}"))?;
        let ok = match &ext.blob {
            Some(id) => repo.crypto().blob_id(&buf) == *id,
            None => buf.iter().all(|b| *b == 0),
        };
        if !ok {
            return Err(format!(
                "bytes {at}..{} do not hash to the recorded extent",
                at + ext.len
            ));
        }
        at += ext.len;
    }
    Ok(())
}

/// Reads a share of each large file's extents from the repository and hashes them.
fn sample_extents(req: &FilesVerifyRequest<'_>, files: &[&Picked], rng: &mut Rng) -> Outcome {
    let (mut read, mut bytes, mut bad) = (0usize, 0u64, Vec::new());
    for f in files {
        let mut exts: Vec<_> = f.node.content.iter().filter(|e| e.blob.is_some()).collect();
        if exts.is_empty() {
            continue;
        }
        let want = share_of(exts.len(), req.share);
        rng.shuffle(&mut exts);
        for e in exts.into_iter().take(want) {
            let Some(id) = &e.blob else { continue };
            read += 1;
            match req.repo.read_blob(id) {
                Ok(b) if b.len() as u64 == e.len && req.repo.crypto().blob_id(&b) == *id => {
                    bytes += e.len;
                }
                Ok(b) => bad.push(format!(
                    "{}: an extent of {} bytes read as {} bytes that do not hash to it",
                    f.path.display(),
                    e.len,
                    b.len()
                )),
                Err(err) => bad.push(format!("{}: {err}", f.path.display())),
            }
        }
    }
    if bad.is_empty() {
        (
            StepResult::Passed,
            format!(
                "{read} extents, {bytes} bytes, of {} large files, as recorded",
                files.len()
            ),
        )
    } else {
        (StepResult::Failed, bad.join("; "))
    }
}

/// A small random generator (xorshift) for the sample, seeded from the system.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let mut b = [0u8; 8];
        let _ = getrandom::getrandom(&mut b);
        Self(u64::from_le_bytes(b) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = usize::try_from(self.next() % (i as u64 + 1)).unwrap_or(0);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_rounds_up_and_takes_at_least_one() {
        assert_eq!(share_of(1000, 0.1), 100);
        assert_eq!(share_of(3, 0.1), 1);
        assert_eq!(share_of(3, 1.0), 3);
        assert_eq!(share_of(7, 0.5), 4);
    }

    #[test]
    fn the_shuffle_keeps_every_item() {
        let mut rng = Rng::seeded();
        let mut v: Vec<u32> = (0..100).collect();
        rng.shuffle(&mut v);
        let mut s = v.clone();
        s.sort_unstable();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
    }
}
