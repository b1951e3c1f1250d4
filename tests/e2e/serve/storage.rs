//! The repository server: other hosts' `repo` back up to `repo serve` over TLS with
//! storage tokens; append-only tokens cannot delete, tokens open one repository, quotas
//! hold, a server killed mid-upload loses nothing committed, and a server that returns
//! wrong bytes is caught by the client.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{serve_config, Daemon, Reaped};
use crate::s3::{Fault, FaultProxy};
use crate::support::*;

/// A CA and a server certificate for 127.0.0.1 signed by it: (CA certificate, server
/// certificate, server key). Clients trust the CA (`REPO_CA_CERT`), as at a site.
fn certificate(env: &Env) -> (PathBuf, PathBuf, PathBuf) {
    let p = |n: &str| env.path(n);
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    };
    let s = |p: &PathBuf| p.to_str().unwrap().to_owned();
    let (ca, ca_key, cert, key, csr, ext) = (
        p("ca.pem"),
        p("ca-key.pem"),
        p("cert.pem"),
        p("key.pem"),
        p("server.csr"),
        p("server.ext"),
    );
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=cairn test CA",
        "-keyout",
        &s(&ca_key),
        "-out",
        &s(&ca),
    ]);
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &s(&key),
        "-out",
        &s(&csr),
    ]);
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&ca),
        "-CAkey",
        &s(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &s(&ext),
        "-out",
        &s(&cert),
    ]);
    (ca, cert, key)
}

/// A storage token for `repository`: `mode` is "", "--append-only" or "--read-only".
fn storage_token(env: &Env, config: &Path, name: &str, repository: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "serve",
        "--config",
        config.to_str().unwrap(),
        "token",
        "create",
    ];
    args.extend(["--name", name, "--repository", repository]);
    args.extend_from_slice(extra);
    env.ok(&args).trim().to_owned()
}

/// A site serving over TLS the test's repository as `default` and a second one as
/// `other`: (the CA's certificate, the daemon's config file).
fn tls_site_of_two(server: &Env) -> (PathBuf, PathBuf) {
    let other_repo = server.path("other-repo");
    server.ok(&["-r", other_repo.to_str().unwrap(), "init"]);
    let (ca, cert, key) = certificate(server);
    let config = serve_config(
        server,
        &format!(
            "[tls]\ncertificate = {:?}\nkey = {:?}\n\n[repositories.other]\npath = {:?}\npassword_env = \"REPO_PASSWORD\"\n",
            cert.display().to_string(),
            key.display().to_string(),
            other_repo.display().to_string()
        ),
    );
    (ca, config)
}

/// Another host: its own home (cache), the server's repository by URL, a token.
fn host(url: &str, token: &str, ca: Option<&Path>) -> Env {
    let mut env = Env::without_repo();
    env.repo = PathBuf::from(url);
    env.extra_env.push(("REPO_TOKEN".into(), token.into()));
    if let Some(ca) = ca {
        env.extra_env
            .push(("REPO_CA_CERT".into(), ca.display().to_string()));
    }
    env
}

fn stats(server: &Env) -> serde_json::Value {
    server.json(&["stats"])
}

#[test]
fn hosts_back_up_to_the_repository_server_with_tokens_that_bound_what_they_may_do() {
    let server = Env::new();
    let (ca, config) = tls_site_of_two(&server);
    let admin = storage_token(&server, &config, "admin", "default", &[]);
    let h1 = storage_token(&server, &config, "h1", "default", &["--append-only"]);
    let h2 = storage_token(&server, &config, "h2", "default", &["--append-only"]);
    let small = storage_token(
        &server,
        &config,
        "small",
        "default",
        &["--append-only", "--quota", "200K"],
    );
    let other = storage_token(&server, &config, "other", "other", &[]);
    let d = Daemon::start(&server, &config);
    let url = format!("{}/repo/default", d.url);
    assert!(url.starts_with("https://"), "{url}");

    // Two hosts push at once: a common 8 MiB file and one of their own each.
    let common = server.path("common");
    write_random(&common, 21, 8 << 20);
    let hosts: Vec<Env> = [(&h1, 1u64), (&h2, 2)]
        .iter()
        .map(|(token, seed)| {
            let h = host(&url, token, Some(&ca));
            let src = h.path("src");
            std::fs::create_dir_all(&src).unwrap();
            std::fs::copy(&common, src.join("common")).unwrap();
            write_random(&src.join("own"), 100 + seed, 1 << 20);
            h
        })
        .collect();
    let running: Vec<_> = hosts
        .iter()
        .map(|h| {
            h.cmd()
                .args(["backup", h.path("src").to_str().unwrap()])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in running {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "a host's backup: {}", stderr(&out));
    }
    for h in &hosts {
        let target = h.path("restored");
        h.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
        // Each host's latest is its own or the other's: both trees hold `common`.
        let restored = walk_files(&target);
        assert!(
            restored.iter().any(|p| p.ends_with("common")),
            "{restored:?}"
        );
    }
    // Stored once: at once if one host's index saw the other's packs, else after a
    // prune drops the second copy (two backups racing both store what neither has yet).
    let before = stats(&server);
    eprintln!("after two concurrent pushes: {before}");
    server.ok(&["prune", "--max-unused", "0%"]);
    let after = stats(&server);
    assert_eq!(after["blob_copies"], after["blobs"], "{after}");
    assert!(
        after["stored_bytes"].as_u64().unwrap() < (10 << 20) + (512 << 10),
        "common data stored twice: {after}"
    );

    // A third host starting after them stores none of the common data again.
    let h3 = host(&url, &h1, Some(&ca));
    std::fs::create_dir_all(h3.path("src")).unwrap();
    std::fs::copy(&common, h3.path("src/common")).unwrap();
    let snap = h3.backup(&[&h3.path("src")]);
    assert!(
        snap["summary"]["bytes_stored"].as_u64().unwrap_or(u64::MAX) < 64 << 10
            || snap.to_string().contains("\"bytes_stored\":0"),
        "{snap}"
    );

    // Append-only: no forget, no prune that deletes, no overwrite.
    let h = &hosts[0];
    let out = h.run(&["forget", "latest"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("append-only"), "{}", stderr(&out));
    let admin_host = host(&url, &admin, Some(&ca));
    let first = admin_host.json(&["snapshots"])[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    admin_host.ok(&["forget", &first]);
    let out = h.run(&["prune", "--max-unused", "0%"]);
    assert!(!out.status.success(), "an append-only prune deleted data");
    assert!(stderr(&out).contains("append-only"), "{}", stderr(&out));
    let raw = |method: &str, path: &str, body: Option<&[u8]>| {
        curl(method, &format!("{url}/{path}"), &h1, &ca, body)
    };
    let (status, listing) = raw("GET", "data/", None);
    assert_eq!(status, 200, "{listing}");
    let packs: Vec<String> = serde_json::from_str(&listing).unwrap();
    let victim = &packs[0];
    let (status, text) = raw("PUT", &format!("data/{victim}"), Some(b"ransom note"));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("not the hash"), "{text}");
    let (status, text) = raw("DELETE", &format!("data/{victim}"), None);
    assert_eq!(status, 403, "{text}");
    let (status, _) = raw("PUT", "config", Some(b"x"));
    assert_eq!(status, 403);
    let (status, _) = raw("PUT", "keys/abcd", Some(b"x"));
    assert_eq!(status, 403);
    let (status, _) = raw("GET", "data/..%2F..%2Fconfig", None);
    assert!(status == 400 || status == 404, "{status}");
    let (status, _) = raw("GET", "bogus/x", None);
    assert_eq!(status, 404);
    let (status, _) = raw("GET", &format!("data/{victim}"), None);
    assert_eq!(status, 200, "the pack was not left alone");

    // A token opens its own repository only; a missing or unknown one nothing.
    let wrong = host(&url, &other, Some(&ca));
    let out = wrong.run(&["snapshots"]);
    assert!(
        stderr(&out).contains("is for repository \"other\""),
        "{}",
        stderr(&out)
    );
    let nobody = host(
        &url,
        "cairn_0000000000000000000000000000000000000000000000000000000000000000",
        Some(&ca),
    );
    let out = nobody.run(&["snapshots"]);
    assert!(stderr(&out).contains("401"), "{}", stderr(&out));
    let other_url = format!("{}/repo/other", d.url);
    assert_eq!(
        host(&other_url, &other, Some(&ca))
            .json(&["snapshots"])
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // A quota: the backup that would pass it fails and says so.
    let q = host(&url, &small, Some(&ca));
    let big = q.path("big");
    write_random(&big, 9, 1 << 20);
    let out = q.run(&["backup", big.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("quota"), "{}", stderr(&out));

    // Through all of it, the repository stayed whole.
    server.assert_checks_clean();
}

/// The packs in a host's index (its cache of the one repository it used).
fn indexed_packs(h: &Env) -> u64 {
    let dirs: Vec<_> = std::fs::read_dir(h.cache_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("index.sqlite").exists())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute('SELECT count(*) FROM packs').fetchone()[0])",
        ])
        .arg(dirs[0].join("index.sqlite"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn a_host_new_to_the_repository_asks_the_server_before_it_uploads_and_learns_only_its_own_repository(
) {
    let server = Env::new();
    let (ca, config) = tls_site_of_two(&server);
    let h1 = storage_token(&server, &config, "h1", "default", &["--append-only"]);
    let h2 = storage_token(&server, &config, "h2", "default", &["--append-only"]);
    let reader = storage_token(&server, &config, "reader", "default", &["--read-only"]);
    let other = storage_token(&server, &config, "other", "other", &[]);
    let d = Daemon::start(&server, &config);
    let url = format!("{}/repo/default", d.url);

    // Host 1 stores 96 MiB in six files: several packs. f2 first, alone, so that its
    // chunks lie in the first pack or two (files backed up together interleave).
    let a = host(&url, &h1, Some(&ca));
    let src_a = a.path("src");
    std::fs::create_dir_all(&src_a).unwrap();
    for i in 0..6 {
        write_random(&src_a.join(format!("f{i}")), 60 + i, 16 << 20);
    }
    a.backup(&[&src_a.join("f2")]);
    // And 200 small files (1 to 40 KiB, 4 MiB in all), alone too: one pack of data.
    let small_a = a.path("small");
    std::fs::create_dir_all(&small_a).unwrap();
    for i in 0..200u64 {
        write_random(
            &small_a.join(format!("s{i}")),
            1000 + i,
            1024 + (i as usize * 997) % (39 << 10),
        );
    }
    let small_bytes: u64 = walk_files(&small_a)
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    a.backup(&[&small_a]);
    a.backup(&[&src_a]);
    let stored_packs = walk_files(&server.repo.join("data")).len() as u64;
    assert!(stored_packs >= 6, "{stored_packs} packs");

    // Host 2, new (an empty cache), backs up one of those large files, the small files
    // and a note: it asks the server (before the large file's chunks are encoded, and
    // once a pack's worth of the small files' blobs is ready), reads the trailers of the
    // packs named for them only, and sends the note alone.
    let b = host(&url, &h2, Some(&ca));
    let src_b = b.path("src");
    std::fs::create_dir_all(src_b.join("small")).unwrap();
    std::fs::copy(src_a.join("f2"), src_b.join("f2")).unwrap();
    for f in walk_files(&small_a) {
        std::fs::copy(&f, src_b.join("small").join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(src_b.join("note"), "host 2's own\n").unwrap();
    let snap = b.backup(&[&src_b]);
    let sent = snap["summary"]["bytes_stored"].as_u64().unwrap();
    // The note, and the trees (host 2's directories: its own times and names).
    assert!(
        sent < 64 << 10,
        "host 2 sent {sent} bytes (the small files are {small_bytes}): {snap}"
    );
    // Its index: its own packs (the note's data, its trees) and the packs of host 1 that
    // hold f2 (16 MiB of chunks: one pack of 16 MiB and the start of the next) and the
    // small files (one), not host 1's other packs.
    let own = walk_files(&server.repo.join("data")).len() as u64 - stored_packs;
    let learned = indexed_packs(&b) - own;
    assert!(
        learned <= 3,
        "host 2 indexed {learned} of host 1's {stored_packs} packs (and {own} of its own)"
    );
    b.assert_latest_restores(&src_b, "restored");

    // The directory by hand. Ids are 32 bytes (printable ones here, for curl).
    let raw = |token: &str, method: &str, path: &str, body: &[u8]| {
        let (status, answer) = curl_bytes(
            method,
            &format!("{}/repo/{path}", d.url),
            token,
            &ca,
            Some(body),
        );
        (status, answer)
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let id = |c: u8| vec![c; 32];
    // Ids nobody reported: nothing.
    let (status, answer) = raw(
        &reader,
        "POST",
        "default/known",
        &[id(b'q'), id(b'r')].concat(),
    );
    assert_eq!((status, answer.len()), (200, 0), "{}", text(&answer));
    // A malformed question, and one too long.
    let (status, said) = raw(&reader, "POST", "default/known", &[b'q'; 33]);
    assert_eq!(status, 400, "{}", text(&said));
    let (status, said) = raw(&reader, "POST", "default/known", &vec![b'q'; 32 * 65537]);
    assert_eq!(status, 400, "{}", text(&said));
    // Reports: a read token may not; a pack that is not stored cannot be reported; more
    // ids than its bytes could hold are refused.
    let packs = walk_files(&server.repo.join("data"));
    let pack = packs
        .iter()
        .min_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let pack_size = std::fs::metadata(pack).unwrap().len() as usize;
    let pack = pack.file_name().unwrap().to_str().unwrap().to_owned();
    let report = format!("default/data/{pack}/blobs");
    let (status, said) = raw(&reader, "POST", &report, &id(b'a'));
    assert_eq!(status, 403, "{}", text(&said));
    let missing = format!("default/data/{}/blobs", "0".repeat(64));
    let (status, said) = raw(&h1, "POST", &missing, &id(b'a'));
    assert_eq!(status, 404, "{}", text(&said));
    let too_many = vec![b'a'; 32 * (pack_size / 16 + 1)];
    assert!(
        too_many.len() <= 32 * 65536,
        "the smallest pack has {pack_size} bytes"
    );
    let (status, said) = raw(&h1, "POST", &report, &too_many);
    assert_eq!(status, 400, "{}", text(&said));
    // A host's report is kept for its repository, and asked about there only: the
    // token of another repository gets nothing from this one's directory, and its own
    // directory knows nothing of it.
    let (status, said) = raw(&h1, "POST", &report, &id(b'a'));
    assert_eq!(status, 204, "{}", text(&said));
    let (status, answer) = raw(
        &reader,
        "POST",
        "default/known",
        &[id(b'a'), id(b'q')].concat(),
    );
    assert_eq!(status, 200);
    assert_eq!(answer, [id(b'a'), hex_bytes(&pack)].concat());
    let (status, said) = raw(&other, "POST", "default/known", &id(b'a'));
    assert_eq!(status, 403, "{}", text(&said));
    assert!(
        text(&said).contains("is for repository \"other\""),
        "{}",
        text(&said)
    );
    let (status, answer) = raw(&other, "POST", "other/known", &id(b'a'));
    assert_eq!((status, answer.len()), (200, 0), "{}", text(&answer));

    // That report was a lie (pack holds no blob "aaa…"): a host is not fooled by the
    // like of it, since it believes only trailers (see the engine's tests); and the
    // repository is whole.
    server.assert_checks_clean();
}

/// 64 hex digits as their 32 bytes.
fn hex_bytes(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// A raw request with `curl`: (status, body).
fn curl(method: &str, url: &str, token: &str, cert: &Path, body: Option<&[u8]>) -> (u16, String) {
    let (status, body) = curl_bytes(method, url, token, cert, body);
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A raw request with `curl`: (status, body), the body sent from a file (any bytes, any
/// size) and the answer kept as bytes.
fn curl_bytes(
    method: &str,
    url: &str,
    token: &str,
    cert: &Path,
    body: Option<&[u8]>,
) -> (u16, Vec<u8>) {
    let scratch = tempfile::tempdir().unwrap();
    let (sent, answer) = (scratch.path().join("sent"), scratch.path().join("answer"));
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "--max-time",
        "30",
        "-w",
        "%{http_code}",
        "-X",
        method,
    ])
    .arg("-o")
    .arg(&answer)
    .arg("--cacert")
    .arg(cert)
    .args(["-H", &format!("Authorization: Bearer {token}")]);
    if let Some(b) = body {
        std::fs::write(&sent, b).unwrap();
        c.arg("--data-binary").arg(format!("@{}", sent.display()));
    }
    let out = c.arg("--path-as-is").arg(url).output().unwrap();
    let status = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (status, std::fs::read(&answer).unwrap_or_default())
}

#[test]
fn a_server_killed_mid_upload_loses_nothing_and_the_next_push_reuses_what_arrived() {
    let server = Env::new();
    let config = serve_config(&server, "");
    let token = storage_token(&server, &config, "h1", "default", &["--append-only"]);
    let port = crate::dbserver::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut d = Daemon::start_on(&server, &config, &listen, &[]);
    let h = host(&format!("{}/repo/default", d.url), &token, None);
    let src = h.path("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..6 {
        write_random(&src.join(format!("f{i}")), 40 + i, 12 << 20);
    }
    let child = h
        .cmd()
        .args(["backup", src.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Killed once two packs are in (under their names: not the server's temporary files).
    let data = server.repo.join("data");
    let packs = || {
        walk_files(&data)
            .into_iter()
            .filter(|p| p.parent() != Some(data.as_path()))
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while packs() < 2 {
        assert!(std::time::Instant::now() < deadline, "no pack arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
    d.kill9();
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "a backup without its server succeeded"
    );
    let arrived = packs();
    assert!(server.json(&["snapshots"]).as_array().unwrap().is_empty());

    let _d = Daemon::start_on(&server, &config, &listen, &[]);
    let snap = h.backup(&[&src]);
    let stored = snap["summary"]["bytes_stored"].as_u64().unwrap();
    assert!(
        stored < (72 << 20) - (arrived as u64 - 1) * (15 << 20),
        "the second push sent everything again ({stored} bytes; {arrived} packs had arrived)"
    );
    h.assert_latest_restores(&src, "restored");
    server.assert_checks_clean();
}

#[test]
fn a_server_that_returns_wrong_bytes_is_caught_by_the_client() {
    let server = Env::new();
    let config = serve_config(&server, "");
    let token = storage_token(&server, &config, "h1", "default", &["--append-only"]);
    let d = Daemon::start(&server, &config);
    let port: u16 = d.url.rsplit(':').next().unwrap().parse().unwrap();
    let h = host(&format!("{}/repo/default", d.url), &token, None);
    let src = h.path("src");
    std::fs::create_dir_all(&src).unwrap();
    write_random(&src.join("f"), 77, 3 << 20);
    h.backup(&[&src]);
    // Through a proxy that flips the last byte of every pack read.
    let proxy = FaultProxy::start(port, usize::MAX, |_, line| {
        (line.starts_with("GET") && line.contains("/data/") && !line.contains("/data/ "))
            .then_some(Fault::Corrupt)
    });
    let mut hostile = host(
        &format!("http://127.0.0.1:{}/repo/default", proxy.port),
        &token,
        None,
    );
    hostile.dir = h.dir;
    let target = hostile.path("restored");
    let out = hostile.run(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "a restore of altered bytes succeeded"
    );
    // Which read the proxy spoiled first decides the message (a pack's trailer, a
    // blob): it names what failed either way.
    let err = stderr(&out);
    assert!(err.contains("pack") || err.contains("blob"), "{err}");
    assert!(proxy.faults.load(std::sync::atomic::Ordering::SeqCst) > 0);
    // What storage holds was never touched: read directly, it restores and checks.
    let direct = host(&format!("{}/repo/default", d.url), &token, None);
    direct.assert_latest_restores(&src, "restored-direct");
    server.assert_checks_clean();
}

/// Network namespaces made by the test (other hosts), deleted on drop.
struct Lab {
    namespaces: Vec<String>,
}

impl Lab {
    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {}", stderr(&out));
    }

    /// A server namespace and one per host, each host joined to the server by a veth
    /// pair on a link-local /30 of its own (169.254.77.4n+1 the server, +2 the host).
    fn new(hosts: usize) -> Self {
        let tag = std::process::id() % 100_000;
        let mut lab = Lab {
            namespaces: Vec::new(),
        };
        let server = format!("cairn-srv-{tag}");
        Self::ip(&["netns", "add", &server]);
        lab.namespaces.push(server.clone());
        Self::ip(&["-n", &server, "link", "set", "lo", "up"]);
        for n in 0..hosts {
            let ns = format!("cairn-h{n}-{tag}");
            Self::ip(&["netns", "add", &ns]);
            lab.namespaces.push(ns.clone());
            let (h, s) = (format!("ch{n}-{tag}"), format!("cs{n}-{tag}"));
            Self::ip(&["link", "add", &h, "type", "veth", "peer", "name", &s]);
            Self::ip(&["link", "set", &h, "netns", &ns]);
            Self::ip(&["link", "set", &s, "netns", &server]);
            let base = 4 * n;
            Self::ip(&[
                "-n",
                &server,
                "addr",
                "add",
                &format!("169.254.77.{}/30", base + 1),
                "dev",
                &s,
            ]);
            Self::ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("169.254.77.{}/30", base + 2),
                "dev",
                &h,
            ]);
            Self::ip(&["-n", &server, "link", "set", &s, "up"]);
            Self::ip(&["-n", &ns, "link", "set", &h, "up"]);
            Self::ip(&["-n", &ns, "link", "set", "lo", "up"]);
            // 40 Mbit/s: a push takes seconds, long enough to cut it in the middle.
            let out = Command::new("tc")
                .args(["-n", &ns, "qdisc", "add", "dev", &h, "root", "tbf"])
                .args(["rate", "40mbit", "burst", "64kb", "latency", "400ms"])
                .output()
                .unwrap();
            assert!(out.status.success(), "tc: {}", stderr(&out));
        }
        lab
    }

    fn server(&self) -> &str {
        &self.namespaces[0]
    }

    fn host(&self, n: usize) -> &str {
        &self.namespaces[n + 1]
    }

    fn link(&self, n: usize, up: bool) {
        let tag = std::process::id() % 100_000;
        let ns = self.host(n).to_owned();
        Self::ip(&[
            "-n",
            &ns,
            "link",
            "set",
            &format!("ch{n}-{tag}"),
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `repo ARGS` of `env`, run inside namespace `ns`.
fn in_namespace(ns: &str, env: &Env, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    env.environment(&mut c);
    c.args(["netns", "exec", ns, repo_bin()]).args(args);
    c.stdin(std::process::Stdio::null());
    c
}

#[test]
fn hosts_in_namespaces_of_their_own_push_at_once_and_one_survives_a_network_cut() {
    if !require_root("hosts in network namespaces") {
        return;
    }
    let server = Env::new();
    let config = serve_config(&server, "");
    let tokens: Vec<String> = (0..2)
        .map(|n| {
            storage_token(
                &server,
                &config,
                &format!("h{n}"),
                "default",
                &["--append-only"],
            )
        })
        .collect();
    let lab = Lab::new(2);
    let port = 18_000 + (std::process::id() % 1000) as u16;
    let mut daemon = in_namespace(
        lab.server(),
        &server,
        &[
            "serve",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--config",
            config.to_str().unwrap(),
        ],
    )
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut err = std::io::BufReader::new(daemon.stderr.take().unwrap());
    loop {
        let mut line = String::new();
        use std::io::BufRead;
        assert!(err.read_line(&mut line).unwrap() > 0, "repo serve exited");
        if line.contains("listening on") {
            break;
        }
    }
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    let _daemon = Reaped(daemon);

    let common = server.path("common");
    write_random(&common, 31, 10 << 20);
    let hosts: Vec<Env> = (0..2)
        .map(|n| {
            let url = format!("http://169.254.77.{}:{port}/repo/default", 4 * n + 1);
            let h = host(&url, &tokens[n], None);
            let src = h.path("src");
            std::fs::create_dir_all(&src).unwrap();
            std::fs::copy(&common, src.join("common")).unwrap();
            write_random(&src.join("own"), 300 + n as u64, 20 << 20);
            h
        })
        .collect();
    let running: Vec<_> = hosts
        .iter()
        .enumerate()
        .map(|(n, h)| {
            in_namespace(lab.host(n), h, &["backup", h.path("src").to_str().unwrap()])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Host 0's link goes down for 3 s once the first pack is in, then comes back: the
    // connection it was sending on carries on.
    let data = server.repo.join("data");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while walk_files(&data)
        .iter()
        .filter(|p| p.parent() != Some(data.as_path()))
        .count()
        < 1
    {
        assert!(std::time::Instant::now() < deadline, "no pack arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
    lab.link(0, false);
    std::thread::sleep(Duration::from_secs(3));
    lab.link(0, true);
    for (n, child) in running.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "host {n}: {}", stderr(&out));
    }
    for (n, h) in hosts.iter().enumerate() {
        let target = h.path("restored");
        let out = in_namespace(
            lab.host(n),
            h,
            &[
                "restore",
                "latest",
                "--path",
                h.path("src").to_str().unwrap(),
                "--target",
                target.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
        assert!(out.status.success(), "host {n} restore: {}", stderr(&out));
        assert_same_tree(&h.path("src"), &under(&target, &h.path("src")));
    }
    server.ok(&["prune", "--max-unused", "0%"]);
    let stats = stats(&server);
    assert!(
        stats["stored_bytes"].as_u64().unwrap() < (50 << 20) + (512 << 10),
        "the common 10 MiB stored twice: {stats}"
    );
    server.assert_checks_clean();
}
