//! Repositories in S3-compatible object storage: a real S3 server (`s3s-fs`, built by
//! `scripts/install-deps.sh`) on 127.0.0.1, and a proxy in front of it that injects
//! throttling, server errors and hang-ups.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::dbserver::free_port;
use crate::support::*;

const ACCESS_KEY: &str = "cairn-test-key";
const SECRET_KEY: &str = "s3cr3t-never-in-a-log";
const BUCKET: &str = "backups";

/// The S3 server's binary, if this machine has it.
fn s3s_fs() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("CAIRN_S3S_FS").map(PathBuf::from),
        Some(PathBuf::from("/var/cache/cairn/s3s/bin/s3s-fs")),
    ];
    candidates.into_iter().flatten().find(|p| p.exists())
}

/// `s3s-fs` serving a directory on a port of 127.0.0.1; killed on drop.
pub struct S3Server {
    child: Child,
    pub port: u16,
    pub root: PathBuf,
}

impl S3Server {
    pub fn start(bin: &Path, root: PathBuf) -> Self {
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port, root }
    }

    /// The bucket's objects under `prefix`, as paths relative to it.
    pub fn objects(&self, prefix: &str) -> Vec<String> {
        let base = self.root.join(BUCKET).join(prefix);
        walk_files(&base)
            .into_iter()
            .map(|p| p.strip_prefix(&base).unwrap().display().to_string())
            .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An environment whose repository is `prefix` in the bucket, reached at `port`.
fn s3_env(port: u16, prefix: &str) -> Env {
    let mut env = Env::without_repo();
    env.repo = PathBuf::from(format!(
        "s3://{BUCKET}/{prefix}?endpoint=http://127.0.0.1:{port}"
    ));
    env.extra_env = vec![
        ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
    ];
    env
}

fn server(what: &str, env: &Env) -> Option<S3Server> {
    let bin = s3s_fs();
    if !require(
        bin.is_some(),
        what,
        "s3s-fs (scripts/install-deps.sh --test)",
    ) {
        return None;
    }
    Some(S3Server::start(&bin.unwrap(), env.path("s3")))
}

#[test]
fn a_repository_in_s3_backs_up_restores_mounts_forgets_prunes_and_checks() {
    let probe = Env::without_repo();
    let Some(s3) = server("s3 round trip", &probe) else {
        return;
    };
    let env = s3_env(s3.port, "site-a/repo");
    env.ok(&["init", "--pack-size", "128M"]);
    let src = env.path("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    // A pack over 64 MiB goes up as a multipart upload (the repository's packs are
    // 128 MiB), the last one in one PUT.
    write_random(&src.join("big"), 1, 80 << 20);
    write_random(&src.join("sub/small"), 2, 5000);
    std::fs::write(src.join("sub/text"), b"hello s3").unwrap();
    let first = env.backup(&[&src]);
    let first_id = first["id"].as_str().unwrap().to_owned();

    // The objects are named as a local repository's files; no index among them.
    let objects = s3.objects("site-a/repo");
    assert!(objects.contains(&"config".to_owned()), "{objects:?}");
    assert!(objects.iter().any(|o| o.starts_with("keys/")));
    assert!(objects.iter().any(|o| o.starts_with("snapshots/")));
    assert!(objects.iter().any(|o| o.starts_with("data/")));
    assert!(!objects.iter().any(|o| o.contains("index")), "{objects:?}");
    assert!(env.cache_dir().exists(), "no cache on this host");

    env.assert_latest_restores(&src, "restored");

    // A second backup after a change; forget the first and prune its data away.
    write_random(&src.join("big"), 3, 80 << 20);
    env.backup(&[&src]);
    env.ok(&["forget", &first_id]);
    let pruned = env.json(&["prune", "--grace", "0s"]);
    assert!(
        pruned["bytes_freed"].as_u64().unwrap() > 20 << 20,
        "{pruned}"
    );
    assert!(
        pruned["packs_deleted"].as_u64().unwrap() + pruned["packs_repacked"].as_u64().unwrap() > 0,
        "{pruned}"
    );
    env.assert_checks_clean();
    env.assert_latest_restores(&src, "restored-2");

    // Through the mount, with the read cache on disk.
    if require_fuse("s3 mount") {
        let mnt = env.path("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        env.ok(&["mount", mnt.to_str().unwrap(), "--daemon"]);
        let snaps: Vec<_> = std::fs::read_dir(mnt.join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(snaps.len(), 1, "{snaps:?}");
        let big = under(&snaps[0], &src).join("big");
        assert_eq!(hash_file(&big), hash_file(&src.join("big")));
        let cached = dir_bytes(&env.cache_dir().join("packs"));
        assert!(cached >= 80 << 20, "read cache holds {cached} bytes");
        // Read again: served from the cache even with the server gone.
        drop(s3);
        assert_eq!(hash_file(&big), hash_file(&src.join("big")));
        let unmounted = Command::new("fusermount").arg("-u").arg(&mnt).status();
        assert!(unmounted.unwrap().success());
    }
}

#[test]
fn wrong_keys_a_missing_bucket_and_a_dead_endpoint_fail_clearly_and_keep_secrets() {
    let probe = Env::without_repo();
    let Some(s3) = server("s3 bad input", &probe) else {
        return;
    };
    let env = s3_env(s3.port, "repo");
    env.ok(&["init"]);
    let mut wrong = s3_env(s3.port, "repo");
    wrong.extra_env[1].1 = "not-the-secret".into();
    let out = wrong.run(&["snapshots"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("403") && err.contains("access key"), "{err}");

    let mut no_bucket = s3_env(s3.port, "repo");
    no_bucket.repo = PathBuf::from(format!(
        "s3://nobucket/repo?endpoint=http://127.0.0.1:{}",
        s3.port
    ));
    let out = no_bucket.run(&["snapshots"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a cairn repository"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dead = s3_env(free_port(), "repo");
    let started = Instant::now();
    let out = dead.run(&["snapshots"]);
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(120));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("GET http://127.0.0.1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Keys in the URL are refused, and not echoed.
    let out = env.run(&["-r", "s3://AKID:topsecret@backups/repo", "snapshots"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("credentials"),
        "{err}"
    );
    assert!(!err.contains("topsecret"), "{err}");

    // The secret is in no log line, even at debug level, and in no stored object.
    let out = env.cmd().args(["-vv", "snapshots"]).output().unwrap();
    assert!(out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.contains("S3 requests"),
        "no request counts logged: {all}"
    );
    assert!(!all.contains(SECRET_KEY), "the secret was logged: {all}");
    for f in walk_files(&s3.root)
        .into_iter()
        .chain(walk_files(&env.cache_dir()))
    {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(SECRET_KEY),
            "{} holds the secret",
            f.display()
        );
    }
}

/// What the fault proxy does to a request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Fault {
    SlowDown,
    ServerError,
    HangUp,
    Denied,
    /// Forwarded, with the answer's last byte flipped (a hostile or broken server).
    Corrupt,
}

/// An HTTP proxy in front of the S3 server that answers some requests itself, badly:
/// `plan` says, for the n-th request, which fault (if any); at most `budget` faults.
pub(crate) struct FaultProxy {
    pub port: u16,
    pub faults: Arc<AtomicUsize>,
    requests: Arc<AtomicU64>,
}

impl FaultProxy {
    pub(crate) fn start(
        upstream: u16,
        budget: usize,
        plan: impl Fn(u64, &str) -> Option<Fault> + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let plan = Arc::new(plan);
        let (f, r) = (faults.clone(), requests.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (f, r, plan) = (f.clone(), r.clone(), plan.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(client, upstream, budget, &f, &r, &*plan);
                });
            }
        });
        Self {
            port,
            faults,
            requests,
        }
    }
}

/// Reads one request, answers it with a fault or the upstream's answer, closes.
fn serve_one(
    mut client: TcpStream,
    upstream: u16,
    budget: usize,
    faults: &AtomicUsize,
    requests: &AtomicU64,
    plan: &dyn Fn(u64, &str) -> Option<Fault>,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        if line == "\r\n" {
            head.extend_from_slice(b"Connection: close\r\n\r\n");
            break;
        }
        head.extend_from_slice(line.as_bytes());
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let n = requests.fetch_add(1, Ordering::SeqCst);
    let request_line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    let fault = plan(n, &request_line).filter(|_| {
        faults
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| {
                (f < budget).then_some(f + 1)
            })
            .is_ok()
    });
    let answer = |status: &str, code: &str| {
        let xml = format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code></Error>");
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
            xml.len()
        )
    };
    match fault {
        Some(Fault::SlowDown) => client.write_all(answer("503 Slow Down", "SlowDown").as_bytes()),
        Some(Fault::ServerError) => {
            client.write_all(answer("500 Internal Server Error", "InternalError").as_bytes())
        }
        Some(Fault::Denied) => client.write_all(answer("403 Forbidden", "AccessDenied").as_bytes()),
        Some(Fault::HangUp) => Ok(()), // closed without a word
        None | Some(Fault::Corrupt) => {
            let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
            up.write_all(&head)?;
            up.write_all(&body)?;
            let mut response = Vec::new();
            up.read_to_end(&mut response)?;
            if fault == Some(Fault::Corrupt) {
                if let Some(last) = response.last_mut() {
                    *last ^= 0x5a;
                }
            }
            client.write_all(&response)
        }
    }
}

#[test]
fn throttling_server_errors_and_hang_ups_are_retried_and_nothing_is_lost() {
    let probe = Env::without_repo();
    let Some(s3) = server("s3 faults", &probe) else {
        return;
    };
    // Every third request fails, by turns throttled, a 500 and a hang-up: 40 in all.
    let proxy = FaultProxy::start(s3.port, 40, |n, _| match n % 9 {
        2 => Some(Fault::SlowDown),
        5 => Some(Fault::ServerError),
        8 => Some(Fault::HangUp),
        _ => None,
    });
    let env = s3_env(proxy.port, "flaky");
    env.ok(&["init"]);
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    write_random(&src.join("big"), 7, 18 << 20);
    for i in 0..30 {
        std::fs::write(src.join(format!("f{i}")), format!("file {i}")).unwrap();
    }
    env.backup(&[&src]);
    env.assert_latest_restores(&src, "restored");
    env.assert_checks_clean();
    let faults = proxy.faults.load(Ordering::SeqCst);
    assert!(faults >= 10, "only {faults} faults injected");
    eprintln!(
        "{faults} faults in {} requests",
        proxy.requests.load(Ordering::SeqCst)
    );

    // A refusal is an answer, not a fault: not retried, the backup fails at once and
    // says why; what was committed before is whole.
    let denied = FaultProxy::start(s3.port, usize::MAX, |_, line| {
        line.starts_with("PUT").then_some(Fault::Denied)
    });
    let mut env2 = s3_env(denied.port, "flaky");
    env2.dir = env.dir;
    std::fs::write(src.join("new"), b"a new file").unwrap();
    let started = Instant::now();
    let out = env2.run(&["backup", src.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a backup with every PUT refused succeeded"
    );
    assert!(err.contains("403"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
    let direct = s3_env(s3.port, "flaky");
    let mut direct = direct;
    direct.dir = env2.dir;
    direct.assert_checks_clean();
    assert_eq!(direct.json(&["snapshots"]).as_array().unwrap().len(), 1);
}

#[test]
fn a_job_of_the_control_plane_backs_up_to_s3() {
    let probe = Env::without_repo();
    let Some(s3) = server("s3 job", &probe) else {
        return;
    };
    let env = s3_env(s3.port, "jobs");
    env.ok(&["init"]);
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), b"first").unwrap();
    env.ok(&["backup", src.to_str().unwrap(), "--save-as", "etc"]);
    std::fs::write(src.join("a"), b"second").unwrap();
    env.ok(&["job", "run", "etc"]);
    let snaps = env.json(&["snapshots"]);
    assert_eq!(snaps.as_array().unwrap().len(), 2, "{snaps}");
    let out = env.ok(&["cat", "latest", src.join("a").to_str().unwrap()]);
    assert_eq!(out, "second");
}

#[test]
fn repo_copy_moves_snapshots_to_s3_under_another_key_once() {
    let probe = Env::without_repo();
    let Some(s3) = server("repo copy", &probe) else {
        return;
    };
    let local = Env::new();
    let src = local.path("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    write_random(&src.join("big"), 11, 9 << 20);
    std::fs::write(src.join("d/a"), b"one").unwrap();
    local.backup(&[&src]);
    std::fs::write(src.join("d/a"), b"two").unwrap();
    local.backup(&[&src]);

    let mut remote = s3_env(s3.port, "copy");
    remote.dir = tempfile::Builder::new()
        .prefix("cairn-e2e-")
        .tempdir_in(local.dir.path())
        .unwrap();
    remote
        .extra_env
        .push(("REPO_PASSWORD".into(), "another password".into()));
    remote.ok(&["init"]);

    let copy = |extra: &[&str]| {
        let mut args = vec!["copy", "--to", remote.repo.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        let mut c = local.cmd();
        c.args(&args)
            .env("REPO_TO_PASSWORD", "another password")
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
        let out = c.output().unwrap();
        let text = succeeded("repo copy", out);
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    };
    // The newest one first, then all: the first is not copied twice.
    let first = copy(&["--latest", "1"]);
    assert_eq!(first["copied"].as_array().unwrap().len(), 1, "{first}");
    assert!(first["blobs_new"].as_u64().unwrap() > 2);
    let second = copy(&[]);
    assert_eq!(second["copied"].as_array().unwrap().len(), 1, "{second}");
    assert_eq!(second["skipped"].as_array().unwrap().len(), 1, "{second}");
    // Only the changed file's data and the trees above it were new.
    assert!(
        second["bytes_stored"].as_u64().unwrap() < 1 << 20,
        "{second}"
    );
    let again = copy(&[]);
    assert_eq!(again["copied"].as_array().unwrap().len(), 0, "{again}");
    assert_eq!(again["blobs_read"], 0, "{again}");
    assert_eq!(again["blobs_new"], 0, "{again}");

    // The copies restore byte for byte under the destination's own key, and check.
    let snaps = remote.json(&["snapshots"]);
    assert_eq!(snaps.as_array().unwrap().len(), 2, "{snaps}");
    remote.assert_latest_restores(&src, "restored");
    remote.assert_checks_clean();

    // A wrong destination password is refused before anything is written.
    let mut c = local.cmd();
    c.args(["copy", "--to", remote.repo.to_str().unwrap()])
        .env("REPO_TO_PASSWORD", "wrong")
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    let out = c.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("destination"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_repository_inited_with_anothers_chunker_params_shares_data_with_its_copies() {
    let local = Env::without_repo();
    local.ok(&["init", "--chunk-sizes", "64K,128K,1M"]);
    let src = local.path("src");
    std::fs::create_dir_all(&src).unwrap();
    write_random(&src.join("data"), 5, 6 << 20);
    local.backup(&[&src]);

    let mut other = Env::without_repo();
    other.dir = tempfile::Builder::new()
        .prefix("cairn-e2e-")
        .tempdir_in(local.dir.path())
        .unwrap();
    other.repo = other.path("repo");
    let bad = other.run(&["init", "--copy-chunker-params-from", "/nonexistent/repo"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a cairn repository"));
    other.ok(&[
        "init",
        "--copy-chunker-params-from",
        local.repo.to_str().unwrap(),
    ]);
    // Its own backup of the same data, then the copy: the copy's data is all there.
    other.backup(&[&src]);
    let out = local
        .cmd()
        .args(["copy", "--to", other.repo.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(&succeeded("repo copy", out)).unwrap();
    assert_eq!(report["copied"].as_array().unwrap().len(), 1, "{report}");
    assert!(report["blobs_read"].as_u64().unwrap() > 10, "{report}");
    assert!(
        report["bytes_stored"].as_u64().unwrap() < 64 << 10,
        "the copy stored its data again: {report}"
    );
}
