//! Prune, repair and locks: crash safety under kill -9 at random points, a prune beside
//! running backups, a flipped byte in a pack, stale and live locks.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

const MIB: usize = 1 << 20;

/// A repository with 1 MiB packs, so that a few MiB of data make many pack files.
fn small_pack_env() -> Env {
    let env = Env::without_repo();
    env.ok(&["init", "--pack-size", "1M"]);
    env
}

/// A little deterministic generator (xorshift) for kill delays and choices.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A source tree of `files` files of `len` bytes whose content is given by seeds.
struct Source {
    dir: std::path::PathBuf,
    seeds: Vec<u64>,
    len: usize,
}

impl Source {
    fn new(dir: std::path::PathBuf, files: usize, len: usize) -> Self {
        fs::create_dir_all(&dir).unwrap();
        let s = Self {
            dir,
            seeds: (1..=files as u64).collect(),
            len,
        };
        for i in 0..files {
            s.write(i);
        }
        s
    }
    fn write(&self, i: usize) {
        write_random(&self.dir.join(format!("f{i:02}")), self.seeds[i], self.len);
    }
    /// Gives `n` files new content.
    fn change(&mut self, rng: &mut Rng, n: usize) {
        for _ in 0..n {
            let i = rng.below(self.seeds.len() as u64) as usize;
            self.seeds[i] = rng.next();
            self.write(i);
        }
    }
}

fn snapshot_ids(env: &Env) -> HashSet<String> {
    env.json(&["snapshots"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Restores `id` and asserts every file has the content its seed gives.
fn assert_restores(env: &Env, id: &str, src: &Path, seeds: &[u64], len: usize) {
    let t = env.path("verify");
    let _ = fs::remove_dir_all(&t);
    env.ok(&["restore", id, "--target", t.to_str().unwrap()]);
    let dir = under(&t, src);
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), seeds.len(), "snapshot {id}: files {names:?}");
    for (i, seed) in seeds.iter().enumerate() {
        let want = blake3::hash(&{
            // write_random writes 16 MiB blocks with consecutive seeds; files here are smaller.
            assert!(len <= 16 * MIB);
            random_bytes(*seed, len)
        });
        assert_eq!(
            hash_file(&dir.join(format!("f{i:02}"))),
            want,
            "snapshot {id}: f{i:02} differs from what was backed up"
        );
    }
    fs::remove_dir_all(&t).unwrap();
}

/// SIGKILLs `child`; says whether it was still running (it had not finished on its own).
fn kill9(mut child: Child) -> bool {
    let running = child.try_wait().unwrap().is_none();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    running
}

/// Runs `repo ARGS` and stops it the hard way: for even rounds a SIGKILL after a random
/// delay below `window` x 1.2; for odd ones the process SIGKILLs itself at storage crash
/// point `1 + round / 2 * 3` (before a file is created, synced, renamed or removed: see
/// `CAIRN_TESTONLY_CRASH_AT`), which reaches every step of a short run. Returns a label.
///
/// `window` starts as the duration of one whole run and follows the runs actually seen:
/// a kill that comes after the run finished shrinks it, one that stops a run grows it a
/// little (so about one kill in seven lands after the end). A window measured once would
/// drift from the runs it aims at when the machine's load changes (other tests in
/// parallel), and then most kills would land after the end.
fn run_and_kill(
    env: &Env,
    args: &[&str],
    round: u64,
    window: &mut Duration,
    rng: &mut Rng,
) -> String {
    if round % 2 == 0 {
        let child = spawn_quiet(env, args, None);
        let delay = rng.below(window.as_micros() as u64 * 6 / 5);
        std::thread::sleep(Duration::from_micros(delay));
        if kill9(child) {
            *window = window.mul_f64(1.05);
            format!("killed after {delay} us")
        } else {
            *window = window.mul_f64(0.75);
            format!("finished before the kill at {delay} us")
        }
    } else {
        let point = 1 + (round / 2) * 3;
        let mut child = spawn_quiet(env, args, Some(point));
        child.wait().unwrap();
        format!("killed itself at storage crash point {point}")
    }
}

fn spawn_quiet(env: &Env, args: &[&str], crash_at: Option<u64>) -> Child {
    let mut cmd = env.cmd();
    if let Some(n) = crash_at {
        cmd.env("CAIRN_TESTONLY_CRASH_AT", n.to_string());
    }
    cmd.args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn backups_killed_at_50_random_points_lose_no_committed_snapshot() {
    let env = small_pack_env();
    let len = MIB;
    let mut src = Source::new(env.path("src"), 12, len);
    let srcs = src.dir.to_str().unwrap().to_owned();
    let mut rng = Rng(0x5EED_0001);
    let mut committed: HashMap<String, Vec<u64>> = HashMap::new();
    let first = env.backup(&[&src.dir])["id"].as_str().unwrap().to_owned();
    committed.insert(first, src.seeds.clone());
    // How long a backup of a 3-file change takes, to spread the kills over it.
    src.change(&mut rng, 3);
    let t = Instant::now();
    let id = env.backup(&[&src.dir])["id"].as_str().unwrap().to_owned();
    let mut window = t.elapsed();
    committed.insert(id, src.seeds.clone());
    let mut interrupted = 0;
    for round in 0..50u64 {
        src.change(&mut rng, 3);
        let before = snapshot_ids(&env);
        let how = run_and_kill(&env, &["backup", &srcs], round, &mut window, &mut rng);
        let new: Vec<String> = snapshot_ids(&env).difference(&before).cloned().collect();
        assert!(new.len() <= 1, "round {round}: {new:?}");
        match new.first() {
            Some(id) => {
                committed.insert(id.clone(), src.seeds.clone());
            }
            None => interrupted += 1,
        }
        let out = env.run(&["check", "--read-data"]);
        assert!(
            out.status.success(),
            "round {round} ({how}): check failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    eprintln!(
        "{interrupted} of 50 kills interrupted a backup; {} snapshots committed",
        committed.len()
    );
    assert!(
        interrupted >= 10,
        "only {interrupted} of 50 kills interrupted a backup: the kill points are not spread"
    );
    // Every snapshot committed before any kill restores byte for byte.
    assert_eq!(snapshot_ids(&env).len(), committed.len());
    for (id, seeds) in &committed {
        assert_restores(&env, id, &src.dir, seeds, len);
    }
    // What the killed runs left behind is reported and cleaned.
    let locks = env.json(&["locks"]);
    assert!(locks
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["stale"].is_string()));
    env.ok(&["unlock"]);
    assert!(env.json(&["locks"]).as_array().unwrap().is_empty());
}

#[test]
fn prunes_killed_at_50_random_points_lose_no_kept_snapshot() {
    let env = small_pack_env();
    let len = MIB;
    let mut src = Source::new(env.path("src"), 12, len);
    let mut rng = Rng(0x5EED_0002);
    let mut expected: HashMap<String, Vec<u64>> = HashMap::new();
    let round_setup =
        |src: &mut Source, rng: &mut Rng, expected: &mut HashMap<String, Vec<u64>>| {
            src.change(rng, 4);
            let id = env.backup(&[&src.dir])["id"].as_str().unwrap().to_owned();
            expected.insert(id, src.seeds.clone());
            env.ok(&["forget", "--keep-last", "3"]);
            let now = snapshot_ids(&env);
            expected.retain(|k, _| now.contains(k));
        };
    for _ in 0..5 {
        round_setup(&mut src, &mut rng, &mut expected);
    }
    let prune = ["prune", "--grace", "0", "--max-unused", "0%"];
    let t = Instant::now();
    let report = env.json(&prune);
    let mut window = t.elapsed();
    assert!(report["bytes_freed"].as_u64().unwrap() > 0, "{report}");
    let mut interrupted = 0;
    for round in 0..50u64 {
        round_setup(&mut src, &mut rng, &mut expected);
        let packs_before = env.packs().len();
        let how = run_and_kill(&env, &prune, round, &mut window, &mut rng);
        if env.packs().len() == packs_before {
            interrupted += 1;
        }
        let out = env.run(&["check", "--read-data"]);
        assert!(
            out.status.success(),
            "round {round} (prune {how}): check failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        for (id, seeds) in &expected {
            assert_restores(&env, id, &src.dir, seeds, len);
        }
    }
    eprintln!("{interrupted} of 50 kills came before the prune changed the pack count");
    assert!(
        interrupted >= 5,
        "only {interrupted} of 50 kills came before the prune deleted anything"
    );
    // A prune that runs to the end afterwards still finds and frees the leftovers.
    env.ok(&prune);
    env.ok(&["check", "--read-data"]);
    for (id, seeds) in &expected {
        assert_restores(&env, id, &src.dir, seeds, len);
    }
}

/// A `repo backup --stdin` fed through a pipe we hold: it runs (and holds its shared
/// lock) until we close the pipe.
struct PipedBackup {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
}

impl PipedBackup {
    fn start(env: &Env, name: &str) -> Self {
        let mut child = env
            .cmd()
            .args(["backup", "--stdin", "--name", name, "--json"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        Self { child, stdin }
    }
    fn feed(&mut self, data: &[u8]) {
        self.stdin.as_mut().unwrap().write_all(data).unwrap();
    }
    fn finish(mut self) -> Value {
        drop(self.stdin.take());
        let out = self.child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "backup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["snapshot"].clone()
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn live_locks(env: &Env, operation: &str) -> usize {
    env.json(&["locks"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["lock"]["operation"] == operation && l["stale"].is_null())
        .count()
}

#[test]
fn prune_beside_two_running_backups_loses_nothing() {
    let env = small_pack_env();
    // Data that only a soon-forgotten snapshot holds: garbage for the prune, yet the two
    // backups below deduplicate against it.
    let shared = random_bytes(41, 6 * MIB);
    let g = env.path("g");
    fs::create_dir_all(&g).unwrap();
    fs::write(g.join("big"), &shared).unwrap();
    let old = env.backup(&[&g])["id"].as_str().unwrap().to_owned();
    let own_a = random_bytes(42, 3 * MIB);
    let own_b = random_bytes(43, 3 * MIB);
    let mut a = PipedBackup::start(&env, "a");
    let mut b = PipedBackup::start(&env, "b");
    // The first halves go in while the old snapshot still exists...
    a.feed(&shared[..3 * MIB]);
    b.feed(&shared[..3 * MIB]);
    wait_for(
        "both backups to hold their locks",
        Duration::from_secs(30),
        || live_locks(&env, "backup") == 2,
    );
    env.ok(&["forget", "--keep-tag", "keep"]);
    assert!(!snapshot_ids(&env).contains(&old));
    // ...then the prune marks (the shared data is garbage now) and waits to sweep.
    let mut prune = env
        .cmd()
        .args([
            "prune",
            "--grace",
            "0",
            "--max-unused",
            "0%",
            "--json",
            "-v",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(prune.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines() {
            let line = line.unwrap_or_default();
            if line.contains("waiting for the repository to be free") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the prune never waited for the backups");
    // The backups go on deduplicating against the condemned data, then commit.
    a.feed(&shared[3 * MIB..]);
    b.feed(&shared[3 * MIB..]);
    a.feed(&own_a);
    b.feed(&own_b);
    let sa = a.finish();
    let sb = b.finish();
    let out = prune.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prune failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["snapshots_during"], 2, "{report}");
    assert!(
        report["packs_kept_in_use"].as_u64().unwrap() >= 1,
        "the prune did not keep the packs the new snapshots use: {report}"
    );
    env.ok(&["check", "--read-data"]);
    for (snap, own) in [(&sa, &own_a), (&sb, &own_b)] {
        let t = env.path("out");
        let _ = fs::remove_file(&t);
        let bytes = env
            .cmd()
            .args(["cat", snap["id"].as_str().unwrap()])
            .output()
            .unwrap();
        assert!(bytes.status.success());
        let mut want = shared.clone();
        want.extend_from_slice(own);
        assert!(bytes.stdout == want, "snapshot {} differs", snap["id"]);
    }
    // Now that nothing needs less, a second prune frees nothing in use.
    env.ok(&["prune", "--grace", "0", "--max-unused", "0%"]);
    env.ok(&["check", "--read-data"]);
}

#[test]
fn a_flipped_byte_is_named_salvaged_around_recorded_and_healed() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    for (i, name) in ["x", "y", "z"].iter().enumerate() {
        write_random(&src.join(name), 70 + i as u64, 3 * MIB);
    }
    let snap = env.backup(&[&src]);
    let id = snap["id"].as_str().unwrap().to_owned();
    let packs = env.packs();
    let pack = packs
        .iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = fs::read(pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    fs::write(pack, &bytes).unwrap();
    let pack_name = pack.file_name().unwrap().to_str().unwrap().to_owned();

    // check names the pack, the blob and the file.
    let out = env.run(&["check", "--read-data", "--json"]);
    assert_eq!(out.status.code(), Some(14));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let problems = report["problems"].as_array().unwrap();
    assert!(problems
        .iter()
        .any(|p| p["object"] == format!("pack {pack_name}")));
    let affected = report["affected"].as_array().unwrap();
    assert_eq!(affected.len(), 1, "{report}");
    let hit = affected[0]["path"].as_str().unwrap().to_owned();
    let hit_name = Path::new(&hit)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(problems.iter().any(|p| p["object"]
        .as_str()
        .unwrap()
        .contains(affected[0]["blob"].as_str().unwrap())));

    // The other files still restore.
    let others: Vec<&str> = ["x", "y", "z"]
        .into_iter()
        .filter(|n| *n != hit_name)
        .collect();
    let t = env.path("t");
    let others_restore = || {
        for n in &others {
            env.ok(&[
                "restore",
                &id,
                "--target",
                t.to_str().unwrap(),
                "--include",
                src.join(n).to_str().unwrap(),
            ]);
            assert_eq!(hash_file(&under(&t, &src).join(n)), hash_file(&src.join(n)));
        }
    };
    others_restore();

    // repair salvages the pack's intact blobs and records the loss.
    let r = env.json(&["repair"]);
    assert_eq!(r["packs_damaged"], serde_json::json!([pack_name]), "{r}");
    assert_eq!(r["blobs_damaged"].as_array().unwrap().len(), 1);
    let damaged = r["snapshots_damaged"].as_array().unwrap();
    assert_eq!(damaged.len(), 1);
    assert_eq!(damaged[0]["snapshot"], id.as_str());
    assert_eq!(damaged[0]["paths"], serde_json::json!([hit]));
    assert!(env.repo.join("quarantine").join(&pack_name).exists());
    let listed = env.json(&["snapshots"]);
    assert_eq!(listed[0]["damage"]["paths"], serde_json::json!([hit]));
    assert!(env.ok(&["snapshots"]).contains("DAMAGED: 1 blobs lost"));
    assert!(!pack.exists());

    // check now reports exactly the recorded loss, nothing else.
    let out = env.run(&["check", "--read-data", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{report}");
    assert!(problems[0]["message"].as_str().unwrap().contains("missing"));
    let affected = report["affected"].as_array().unwrap();
    assert_eq!(affected.len(), 1);
    assert_eq!(affected[0]["path"], hit.as_str());
    assert_eq!(affected[0]["recorded_by_repair"], true);
    assert_eq!(report["snapshots_marked_damaged"], 1);
    // A prune over a repository with recorded loss works and keeps the damaged snapshot's
    // intact data.
    env.ok(&["prune", "--grace", "0", "--max-unused", "0%"]);
    let out = env.run(&["check", "--read-data", "--json"]);
    let after: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(after["problems"], report["problems"], "{after}");
    // The snapshot was not deleted, and its intact files still restore.
    assert!(snapshot_ids(&env).contains(&id));
    let _ = fs::remove_dir_all(&t);
    others_restore();
    // The source still has the file: backing it up again stores the lost blob again
    // (although the file is unchanged), and the old snapshot is whole once more.
    env.backup(&[&src]);
    let r = env.json(&["repair", "--no-read-data"]);
    assert_eq!(r["snapshots_healed"], 1, "{r}");
    assert!(r["snapshots_damaged"].as_array().unwrap().is_empty());
    env.ok(&["check", "--read-data"]);
    let _ = fs::remove_dir_all(&t);
    env.ok(&["restore", &id, "--target", t.to_str().unwrap()]);
    assert_same_tree(&src, &under(&t, &src));
}

#[test]
fn forget_prune_right_after_the_backups_frees_the_forgotten_data_at_once() {
    let env = small_pack_env();
    let len = 2 * MIB;
    let mut src = Source::new(env.path("src"), 4, len);
    let mut rng = Rng(7);
    let mut last = String::new();
    for _ in 0..3 {
        src.change(&mut rng, 2);
        last = env.backup(&[&src.dir])["id"].as_str().unwrap().to_owned();
    }
    let data_bytes = || dir_bytes(&env.repo.join("data"));
    let before = data_bytes();
    // Written seconds ago, but no backup is running: nothing needs the forgotten data
    // (a one-hour grace period used to keep it all, and free nothing).
    let r = env.json(&["forget", "--keep-last", "1", "--prune"]);
    assert_eq!(r["snapshots"].as_array().unwrap().len(), 3);
    let p = &r["prune"];
    assert!(p["bytes_freed"].as_u64().unwrap() >= 2 * len as u64, "{p}");
    assert_eq!(p["packs_young"], 0, "{p}");
    assert!(data_bytes() < before - 2 * len as u64);
    env.ok(&["check", "--read-data"]);
    assert_restores(&env, &last, &src.dir, &src.seeds, len);
}

#[test]
fn prune_dry_runs_gives_up_without_its_sweep_and_chains_after_forget() {
    let env = small_pack_env();
    let len = 2 * MIB;
    let mut src = Source::new(env.path("src"), 4, len);
    let mut rng = Rng(7);
    let mut last = String::new();
    for _ in 0..3 {
        src.change(&mut rng, 2);
        last = env.backup(&[&src.dir])["id"].as_str().unwrap().to_owned();
    }
    env.ok(&["forget", "--keep-last", "1"]);
    let data_bytes = || dir_bytes(&env.repo.join("data"));
    let before = data_bytes();
    // A dry run reports and changes nothing.
    let dry = env.json(&["prune", "--dry-run"]);
    assert!(dry["packs_deleted"].as_u64().unwrap() > 0, "{dry}");
    assert_eq!(data_bytes(), before);
    // A prune that cannot sweep (a backup holds its lock) gives up after its repack,
    // leaving copies of the used blobs beside the originals: nothing lost, nothing freed.
    let mut holder = PipedBackup::start(&env, "holder");
    wait_for("the backup's lock", Duration::from_secs(30), || {
        live_locks(&env, "backup") == 1
    });
    let out = env.run(&["prune", "--max-unused", "0%", "--lock-wait", "1s"]);
    assert_eq!(out.status.code(), Some(11));
    assert!(data_bytes() > before, "the repack wrote nothing");
    holder.feed(b"held");
    holder.finish();
    env.ok(&["forget", "--keep-last", "1"]);
    // The next prune frees the garbage and those copies in one pass.
    let r = env.json(&["prune", "--max-unused", "0%"]);
    let freed = r["bytes_freed"].as_u64().unwrap();
    assert!(freed as usize >= 3 * len, "{r}");
    assert_eq!(r["bytes_unused_left"], 0, "{r}");
    let after = data_bytes();
    assert!(after < before - 3 * len as u64, "{before} -> {after}");
    // What is left is exactly what the kept snapshot needs: a second prune finds nothing.
    let again = env.json(&["prune", "--max-unused", "0%"]);
    assert_eq!(again["bytes_unused"], 0, "{again}");
    // And no blob is left stored twice.
    let stats = env.json(&["stats"]);
    assert_eq!(stats["blob_copies"], stats["blobs"], "{stats}");
    env.ok(&["check", "--read-data"]);
    assert_restores(&env, &last, &src.dir, &src.seeds, len);
}

#[test]
fn an_interrupted_backups_packs_survive_prunes_until_its_lock_is_removed() {
    let env = small_pack_env();
    let data = random_bytes(99, 16 * MIB);
    // A backup killed halfway: its packs are written, its snapshot is not, its lock
    // stays behind (stale: the process is gone). (A stream is read 8 MiB at a time.)
    let mut killed = PipedBackup::start(&env, "big");
    killed.feed(&data[..12 * MIB]);
    wait_for(
        "two packs of the killed backup",
        Duration::from_secs(30),
        || env.packs().len() >= 2,
    );
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    let packs = env.packs();
    assert!(packs.len() >= 2);
    // A prune now must keep them: they are what the next try reuses.
    let r = env.json(&["prune", "--max-unused", "0%"]);
    assert_eq!(r["packs_deleted"], 0, "{r}");
    assert!(r["packs_young"].as_u64().unwrap() >= 2, "{r}");
    let by = r["protected_by"].to_string();
    assert!(by.contains("backup"), "{r}");
    assert!(packs.iter().all(|p| p.exists()));
    // The next backup of the same data stores only what the killed one had not.
    let mut again = PipedBackup::start(&env, "big");
    again.feed(&data);
    let snap = again.finish();
    let stored = snap["summary"]["bytes_new"].as_u64().unwrap();
    assert!(stored <= 14 * MIB as u64, "stored {stored} again");
    env.ok(&["check", "--read-data"]);
    // Another interrupted backup, then `repo unlock`: its packs are garbage to the next
    // prune.
    let mut killed = PipedBackup::start(&env, "other");
    killed.feed(&random_bytes(100, 12 * MIB));
    let n = env.packs().len();
    wait_for(
        "a pack of the second killed backup",
        Duration::from_secs(30),
        || env.packs().len() > n,
    );
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    env.ok(&["unlock"]);
    let r = env.json(&["prune", "--max-unused", "0%"]);
    assert!(r["packs_deleted"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["packs_young"], 0, "{r}");
    env.ok(&["check", "--read-data"]);
    let out = env
        .cmd()
        .args(["cat", snap["id"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.stdout == data);
}

#[test]
fn locks_block_what_conflicts_stale_ones_do_not_and_unlock_removes_them() {
    let env = Env::new();
    let data = random_bytes(5, 2 * MIB);
    // A live backup holds a shared lock as long as its input is open.
    let mut running = PipedBackup::start(&env, "s");
    running.feed(&data[..MIB]);
    wait_for("the backup's lock", Duration::from_secs(30), || {
        live_locks(&env, "backup") == 1
    });
    // Other shared users go ahead; what needs the repository alone gives up, exit 11,
    // naming the holder.
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), "a").unwrap();
    env.backup(&[&src]);
    for args in [
        &["repair", "--lock-wait", "1s"][..],
        &["prune", "--grace", "0", "--lock-wait", "1s"][..],
        &["index", "rebuild", "--lock-wait", "0"][..],
    ] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(11), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("shared lock by `backup`"), "{args:?}: {err}");
    }
    running.feed(&data[MIB..]);
    running.finish();
    assert!(env.json(&["locks"]).as_array().unwrap().is_empty());

    // An exclusive lock of a live process elsewhere blocks a backup...
    let now = chrono::Utc::now();
    let lock = |refreshed: chrono::DateTime<chrono::Utc>| {
        serde_json::json!({
            "version": 1, "kind": "exclusive", "operation": "prune", "host": "elsewhere",
            "user": "x", "pid": 1, "created": refreshed, "refreshed": refreshed,
        })
        .to_string()
    };
    let name = "0".repeat(64);
    fs::write(env.repo.join("locks").join(&name), lock(now)).unwrap();
    let out = env.run(&["backup", src.to_str().unwrap(), "--lock-wait", "1s"]);
    assert_eq!(out.status.code(), Some(11));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exclusive lock by `prune`"));
    // ...until it has not been refreshed for too long: then it is stale, reported, ignored.
    fs::write(
        env.repo.join("locks").join(&name),
        lock(now - chrono::Duration::hours(1)),
    )
    .unwrap();
    let locks = env.json(&["locks"]);
    assert!(locks[0]["stale"]
        .as_str()
        .unwrap()
        .contains("not refreshed"));
    let out = env.run(&["backup", src.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ignoring stale lock"));
    // A backup killed -9 leaves a lock that is stale at once (its process is gone).
    let mut killed = PipedBackup::start(&env, "k");
    killed.feed(&data[..MIB]);
    wait_for("the backup's lock", Duration::from_secs(30), || {
        live_locks(&env, "backup") == 1
    });
    kill9(killed.child);
    let locks = env.json(&["locks"]);
    assert_eq!(locks.as_array().unwrap().len(), 2);
    assert!(locks
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["stale"].as_str().is_some_and(|s| s.contains("is gone"))));
    let removed = env.json(&["unlock"]);
    assert_eq!(removed.as_array().unwrap().len(), 2);
    assert!(env.json(&["locks"]).as_array().unwrap().is_empty());
    env.ok(&["check"]);
}

#[test]
fn an_interrupted_backup_leaves_packs_the_next_one_reuses() {
    let env = small_pack_env();
    // Streams are read in 16 MiB batches: 20 MiB in, the first batch is saved.
    let data = random_bytes(9, 24 * MIB);
    let mut killed = PipedBackup::start(&env, "s");
    killed.feed(&data[..20 * MIB]);
    wait_for(
        "packs of the interrupted backup",
        Duration::from_secs(60),
        || env.packs().len() >= 5,
    );
    kill9(killed.child);
    let durable: u64 = env
        .packs()
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert!(snapshot_ids(&env).is_empty());
    let r = env.json(&["repair", "--no-read-data"]);
    let orphans = r["packs_unreferenced"].as_u64().unwrap();
    assert!(orphans >= 5, "{r}");
    // A prune within the grace period leaves them for the next backup...
    let p = env.json(&["prune"]);
    assert_eq!(p["bytes_freed"], 0, "{p}");
    // ...which stores only what they do not hold.
    let mut again = PipedBackup::start(&env, "s");
    again.feed(&data);
    let snap = again.finish();
    let stored = snap["summary"]["bytes_new"].as_u64().unwrap();
    assert!(
        stored + durable <= 28 * MIB as u64,
        "the second backup stored {stored} bytes of 24 MiB again, beside {durable} left behind"
    );
    let out = env
        .cmd()
        .args(["cat", snap["id"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.stdout == data);
    env.ok(&["check", "--read-data"]);
}

#[test]
fn a_read_only_repository_is_read_without_a_lock_and_refuses_writes() {
    if !require_root("a read-only bind mount of a repository") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    write_random(&src.join("f"), 3, MIB);
    let snap = env.backup(&[&src])["id"].as_str().unwrap().to_owned();
    let ro = env.path("ro");
    fs::create_dir_all(&ro).unwrap();
    let bind = |args: &[&str]| {
        assert!(std::process::Command::new("mount")
            .args(args)
            .status()
            .unwrap()
            .success());
    };
    bind(&["--bind", env.repo.to_str().unwrap(), ro.to_str().unwrap()]);
    bind(&["-o", "remount,bind,ro", ro.to_str().unwrap()]);
    let _unmount = UnmountOnDrop(ro.clone());
    let run = |args: &[&str]| {
        env.cmd()
            .env("REPO_REPOSITORY", &ro)
            .args(args)
            .output()
            .unwrap()
    };
    let t = env.path("t");
    let out = run(&["restore", &snap, "--target", t.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("reading without one"));
    assert_eq!(
        hash_file(&under(&t, &src).join("f")),
        hash_file(&src.join("f"))
    );
    assert!(run(&["check", "--read-data"]).status.success());
    // Writing needs a lock: a clear error, nothing half done.
    let out = run(&["backup", src.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("locks/"));
}
