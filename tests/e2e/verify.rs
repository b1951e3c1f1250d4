//! `repo verify`: backups proved by use. VM snapshots of the test guest booted in a
//! lab of their own (a network namespace with the copy's tap, the checks run inside
//! it) under a real libvirtd; PostgreSQL snapshots started in Docker and checked;
//! file samples restored and compared. Good backups pass; damaged ones fail with the
//! step that found it named; nothing (domain, namespace, mount, session) is left in
//! any case, also after a kill -9.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::database::{pg_ready, StopAll, PG_IMAGE};
use crate::dbserver::{postgres_cluster, require_docker};
use crate::support::*;
use crate::vm::{backup, have_libvirt, turn, virsh, virsh_ok, vm_env, TestVm};

/// `repo verify ARGS --json`: the verification record and the exit code.
fn verify(env: &Env, args: &[&str]) -> (Value, i32) {
    let mut a = vec!["verify"];
    a.extend_from_slice(args);
    a.push("--json");
    let out = env.run(&a);
    let code = out.status.code().unwrap_or(-1);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "repo {a:?} ({}): no JSON ({e}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, code)
}

fn step_names(v: &Value) -> Vec<String> {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

fn step<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {v:#}"))
}

/// The first failed step's name.
fn failed_step(v: &Value) -> String {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["result"] == "failed")
        .and_then(|s| s["name"].as_str())
        .unwrap_or("")
        .to_owned()
}

/// Whether the lab's tools (ip, busybox) are here; in CI their absence fails.
fn have_lab(what: &str) -> bool {
    let tool = |t: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    have_libvirt(what)
        && require(
            tool("ip") && tool("busybox"),
            what,
            "ip (iproute2) and busybox (busybox-static): scripts/install-deps.sh",
        )
}

fn lab_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("cairn-lab-"))
        .map(str::to_owned)
        .collect()
}

fn verify_domains(source: &str) -> Vec<String> {
    virsh_ok(&["list", "--all", "--name"])
        .lines()
        .filter(|d| d.starts_with(&format!("{source}-verify-")))
        .map(str::to_owned)
        .collect()
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let want = dir.display().to_string();
    fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(1).map(str::to_owned))
        .filter(|mp| mp.starts_with(&want))
        .collect()
}

/// No domain of a verification of `source`, no lab, no mount, no session is left.
fn assert_nothing_left(env: &Env, source: &str) {
    assert_eq!(verify_domains(source), Vec::<String>::new(), "domains left");
    assert_eq!(
        lab_namespaces(),
        Vec::<String>::new(),
        "lab namespaces left"
    );
    let state = env.path("state");
    assert_eq!(mounts_under(&state), Vec::<String>::new(), "mounts left");
    let sessions: Vec<_> = fs::read_dir(state.join("sessions"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(sessions.is_empty(), "session files left: {sessions:?}");
    assert_eq!(env.json(&["recover", "list"]), serde_json::json!([]));
}

/// The host's own address outside loopback (Docker's bridge, or the first other one):
/// a listener there is what a guest that escaped its lab could reach.
fn host_address() -> String {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|a| a.split('/').next())
        .find(|a| !a.starts_with("127."))
        .expect("the host has an address outside loopback")
        .to_owned()
}

#[test]
fn a_good_vm_backup_passes_every_test_in_a_lab_it_cannot_leave_and_leaves_nothing() {
    if !have_lab("VM verification") {
        return;
    }
    let _turn = turn();
    let env = vm_env();
    let _stop = StopAll(&env);
    let vm = TestVm::boot("verify", 0);
    let marker = vm.write("marker", 1);
    let (_, snap) = backup(&env, &vm.name, &[]);
    let id = snap["id"].as_str().unwrap().to_owned();

    // boot: the guest's login prompt, timed.
    let (v, code) = verify(&env, &["vm", &id, "--test", "boot"]);
    assert_eq!((code, v["status"].as_str()), (0, Some("passed")), "{v:#}");
    assert_eq!(step_names(&v), ["restore", "boot", "cleanup"]);
    assert_eq!(v["vm"]["vm_restored"], true);
    assert_eq!(v["vm"]["vm_booted"], true);
    let boot = v["vm"]["boot_time_s"].as_f64().unwrap();
    assert!(boot > 0.0 && boot < v["seconds"].as_f64().unwrap(), "{v:#}");
    assert_eq!(v["cleanup_done"], true);
    eprintln!(
        "verify vm --test boot: {:.1}s, of which boot {boot:.1}s",
        v["seconds"].as_f64().unwrap()
    );
    assert_nothing_left(&env, &vm.name);

    // boot_ping: the guest answers from inside the lab.
    let (v, code) = verify(&env, &["vm", &id, "--test", "boot_ping"]);
    assert_eq!((code, v["status"].as_str()), (0, Some("passed")), "{v:#}");
    assert_eq!(step_names(&v), ["restore", "boot", "ping", "cleanup"]);
    assert_eq!(v["vm"]["ping_ok"], true);
    assert_nothing_left(&env, &vm.name);

    // boot_ping_services: the guest's web server (an HTTP status and a TCP connect).
    let (v, code) = verify(
        &env,
        &[
            "vm",
            &id,
            "--test",
            "boot_ping_services",
            "--services",
            "http,tcp:80",
        ],
    );
    assert_eq!((code, v["status"].as_str()), (0, Some("passed")), "{v:#}");
    assert_eq!(
        step_names(&v),
        [
            "restore",
            "boot",
            "ping",
            "service http",
            "service tcp:80",
            "cleanup"
        ]
    );
    assert!(step(&v, "service http")["detail"]
        .as_str()
        .unwrap()
        .contains("HTTP 200"));
    assert_eq!(v["vm"]["services"]["http"], true);
    assert_eq!(v["vm"]["services"]["tcp:80"], true);
    eprintln!(
        "verify vm --test boot_ping_services: {:.1}s",
        v["seconds"].as_f64().unwrap()
    );
    assert_nothing_left(&env, &vm.name);

    // full: a script in the guest sees the backed-up data and cannot reach the host
    // (a listener on the host's own address gets no connection); a script on the host,
    // inside the lab, reaches the guest's web server.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let host = host_address();
    let guest = env.path("guest.sh");
    fs::write(
        &guest,
        format!(
            "sha256sum /data/marker | grep -q {marker} || {{ echo 'marker differs'; exit 1; }}\n\
             if out=$(timeout 5 wget -q -O /dev/null http://{host}:{port}/ 2>&1); then echo 'reached the host'; exit 1; fi\n\
             echo \"isolated: $out\"\n"
        ),
    )
    .unwrap();
    let on_host = env.path("host.sh");
    fs::write(
        &on_host,
        "#!/bin/sh\ncurl -sS -m 5 \"http://$CAIRN_VERIFY_ADDRESS/\" | grep -q 'cairn test guest'\n",
    )
    .unwrap();
    fs::set_permissions(
        &on_host,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (v, code) = verify(
        &env,
        &[
            "vm",
            &id,
            "--test",
            "full",
            "--services",
            "http",
            "--script",
            guest.to_str().unwrap(),
            "--host-script",
            on_host.to_str().unwrap(),
        ],
    );
    assert_eq!((code, v["status"].as_str()), (0, Some("passed")), "{v:#}");
    let inside = step(&v, "script in the guest")["detail"].as_str().unwrap();
    eprintln!("the guest trying to reach the host: {inside}");
    assert!(
        inside.contains("isolated") && inside.contains("unreachable"),
        "{inside}"
    );
    assert_eq!(step(&v, "script on the host")["result"], "passed");
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the guest reached the host"
    );
    assert_nothing_left(&env, &vm.name);

    // The results: listed, counted; no snapshot is left unverified.
    let list = env.json(&["verify", "list"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 4);
    assert!(list
        .iter()
        .all(|x| x["status"] == "passed" && x["snapshot"] == id.as_str()));
    let shown = env.json(&["verify", "show", &list[0]["id"].to_string()]);
    assert_eq!(shown["test"], "full");
    let st = env.json(&["verify", "stats"]);
    assert_eq!(st["stats"]["total"], 4);
    assert_eq!(st["stats"]["passed"], 4);
    assert_eq!(st["stats"]["success_rate"], 1.0);
    for t in ["boot", "boot_ping", "boot_ping_services", "full"] {
        assert_eq!(st["stats"]["by_test"][t]["passed"], 1, "{st:#}");
    }
    assert_eq!(st["never_verified"], serde_json::json!([]));
    assert!(env.ok(&["verify", "stats"]).contains("success rate 100.0%"));
}

/// A powered-off test guest whose disk holds no system: it never gets past its initrd.
fn guest_without_system() -> TestVm {
    let vm = TestVm::define("noboot", 0);
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(vm_disk(&vm))
            .arg("256M"),
    );
    vm
}

fn vm_disk(vm: &TestVm) -> PathBuf {
    PathBuf::from("/var/tmp/cairn-vm-tests")
        .join(&vm.name)
        .join("vda.qcow2")
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    succeeded(&format!("{cmd:?}"), out);
}

#[test]
fn broken_vm_backups_fail_with_the_step_named_and_leave_nothing_also_after_a_kill() {
    if !have_lab("VM verification") {
        return;
    }
    let _turn = turn();
    let env = vm_env();
    let _stop = StopAll(&env);
    let vm = TestVm::boot("verifybad", 0);
    let (_, good) = backup(&env, &vm.name, &[]);
    let good = good["id"].as_str().unwrap().to_owned();

    // A service that does not listen: its step fails, the others pass.
    let (v, code) = verify(
        &env,
        &[
            "vm",
            &good,
            "--test",
            "boot_ping_services",
            "--services",
            "http,tcp:2222",
            "--service-wait",
            "5s",
        ],
    );
    assert_eq!((code, v["status"].as_str()), (4, Some("failed")), "{v:#}");
    assert_eq!(failed_step(&v), "service tcp:2222");
    assert_eq!(v["vm"]["services"]["http"], true);
    assert_eq!(v["vm"]["services"]["tcp:2222"], false);
    assert_eq!(v["cleanup_done"], true);
    assert_nothing_left(&env, &vm.name);

    // A damaged init in the backup: the guest's kernel panics, the boot step says so.
    vm.exec("rm /sbin/init && printf 'not a program' > /sbin/init && chmod +x /sbin/init && sync");
    let (_, broken) = backup(&env, &vm.name, &[]);
    let (v, code) = verify(
        &env,
        &["vm", broken["id"].as_str().unwrap(), "--test", "boot"],
    );
    assert_eq!((code, v["status"].as_str()), (4, Some("failed")), "{v:#}");
    assert_eq!(failed_step(&v), "boot");
    assert!(
        step(&v, "boot")["detail"]
            .as_str()
            .unwrap()
            .contains("panicked"),
        "{v:#}"
    );
    assert_eq!(v["vm"]["vm_booted"], false);
    assert!(v["log"].as_str().unwrap().contains("console"), "{v:#}");
    assert_eq!(step(&v, "cleanup")["result"], "passed");
    assert_nothing_left(&env, &vm.name);

    // A guest that never boots: the timeout ends it.
    let blank = guest_without_system();
    let (_, never) = backup(&env, &blank.name, &[]);
    let (v, code) = verify(
        &env,
        &[
            "vm",
            never["id"].as_str().unwrap(),
            "--test",
            "boot_ping",
            "--timeout",
            "20s",
        ],
    );
    assert_eq!((code, v["status"].as_str()), (4, Some("failed")), "{v:#}");
    assert_eq!(failed_step(&v), "boot");
    assert!(
        step(&v, "boot")["detail"]
            .as_str()
            .unwrap()
            .contains("timeout"),
        "{v:#}"
    );
    assert_eq!(step(&v, "ping")["result"], "skipped");
    assert_nothing_left(&env, &blank.name);

    // kill -9 while the copy boots: the record says it died, cleanup removes the rest.
    let mut child = env
        .cmd()
        .args(["verify", "vm", &good, "--test", "boot"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !virsh_ok(&["list", "--name"])
        .lines()
        .any(|d| d.starts_with(&format!("{}-verify-", vm.name)))
    {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the copy never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !lab_namespaces().is_empty(),
        "the lab was not made before the boot"
    );
    let r = env.json(&["recover", "cleanup"]);
    assert_eq!(r["sessions_removed"].as_array().unwrap().len(), 1, "{r}");
    assert_nothing_left(&env, &vm.name);
    let last = env.json(&["verify", "list", "--limit", "1"]);
    assert_eq!(last[0]["status"], "failed", "{last:#}");
    assert!(
        last[0]["error"].as_str().unwrap().contains("died"),
        "{last:#}"
    );

    let st = env.json(&["verify", "stats"]);
    assert_eq!(st["stats"]["failed"], 4, "{st:#}");
    assert_eq!(st["stats"]["passed"], 0, "{st:#}");
    let failing: Vec<&str> = st["last_failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["snapshot"].as_str().unwrap())
        .collect();
    assert!(failing.contains(&good.as_str()), "{st:#}");
    let _ = virsh(&["destroy", &vm.name]);
}

#[test]
fn a_database_backup_verifies_and_a_damaged_index_or_a_wrong_expectation_fails() {
    if !pg_ready("database verification") || !require_docker(PG_IMAGE) {
        return;
    }
    let env = Env::new();
    let _stop = StopAll(&env);
    let pg = postgres_cluster(&env, "verify");
    pg.sql(
        "CREATE TABLE items (id int PRIMARY KEY, name text); \
         INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 20000) g; \
         CREATE INDEX items_name ON items (name)",
    );
    let good = env.json(&["backup", "--postgres", &pg.conn()])["snapshot"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let (v, code) = verify(
        &env,
        &[
            "db",
            &good,
            "--query",
            "SELECT id FROM items WHERE id <= 3",
            "--expect-rows",
            "3",
        ],
    );
    assert_eq!((code, v["status"].as_str()), (0, Some("passed")), "{v:#}");
    for s in [
        "start",
        "connect",
        "databases",
        "amcheck",
        "row counts",
        "query 1",
        "cleanup",
    ] {
        assert_eq!(step(&v, s)["result"], "passed", "{s}: {v:#}");
    }
    assert!(
        step(&v, "amcheck")["detail"]
            .as_str()
            .unwrap()
            .contains("intact"),
        "{v:#}"
    );
    assert!(
        step(&v, "row counts")["detail"]
            .as_str()
            .unwrap()
            .contains("1 table, about 20000 rows"),
        "{v:#}"
    );
    eprintln!(
        "verify db (20k rows): {:.1}s",
        v["seconds"].as_f64().unwrap()
    );

    // A wrong expectation fails and shows what the query gave.
    let (v, code) = verify(
        &env,
        &[
            "db",
            &good,
            "--query",
            "SELECT name FROM items WHERE id <= 2 ORDER BY id",
            "--expect-rows",
            "5",
        ],
    );
    assert_eq!((code, v["status"].as_str()), (4, Some("failed")), "{v:#}");
    assert_eq!(failed_step(&v), "query 1");
    let detail = step(&v, "query 1")["detail"].as_str().unwrap();
    assert!(
        detail.contains("item 1") && detail.contains("item 2"),
        "{detail}"
    );
    assert_eq!(step(&v, "cleanup")["result"], "passed");

    // A damaged index page in the backup: amcheck names the index.
    let file = pg.sql("SELECT pg_relation_filepath('items_name')");
    pg.sql("CHECKPOINT");
    let path = PathBuf::from(pg.sql("SHOW data_directory")).join(file);
    let mut bytes = fs::read(&path).unwrap();
    assert!(
        bytes.len() >= 3 * 8192,
        "the index is too small to damage a leaf"
    );
    for (i, b) in bytes[8192 + 100..2 * 8192].iter_mut().enumerate() {
        *b = (i * 131 % 251) as u8;
    }
    fs::write(&path, &bytes).unwrap();
    let damaged = env.json(&["backup", "--postgres", &pg.conn()])["snapshot"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (v, code) = verify(&env, &["db", &damaged]);
    assert_eq!((code, v["status"].as_str()), (4, Some("failed")), "{v:#}");
    assert_eq!(failed_step(&v), "amcheck");
    assert!(
        step(&v, "amcheck")["detail"]
            .as_str()
            .unwrap()
            .contains("items_name"),
        "{v:#}"
    );
    assert_eq!(step(&v, "cleanup")["result"], "passed");
    assert!(env
        .json(&["recover", "list"])
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn a_files_sample_verifies_and_a_damaged_pack_fails_the_restore() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    for i in 0..40u64 {
        write_random(&src.join(format!("f{i}")), i, 20_000 + i as usize * 3000);
    }
    write_random(&src.join("sub/big"), 99, 3 << 20);
    fs::write(src.join("sub/empty"), b"").unwrap();
    let snap = env.backup(&[&src]);
    let id = snap["id"].as_str().unwrap().to_owned();

    let (v, code) = verify(&env, &["files", &id, "--sample", "100%"]);
    assert_eq!((code, v["status"].as_str()), (0, Some("passed")), "{v:#}");
    assert_eq!(step_names(&v), ["sample", "restore", "compare", "cleanup"]);
    assert!(
        step(&v, "sample")["detail"]
            .as_str()
            .unwrap()
            .starts_with("42 of 42 files"),
        "{v:#}"
    );
    let (v, _) = verify(&env, &["files", &id, "--sample", "10%"]);
    assert!(
        step(&v, "sample")["detail"]
            .as_str()
            .unwrap()
            .starts_with("5 of 42 files"),
        "{v:#}"
    );
    let scratch: Vec<_> = fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("cairn-verify-"))
        .collect();
    assert!(scratch.is_empty(), "scratch left: {scratch:?}");

    // One flipped byte in every pack of data: the sample cannot be restored as recorded.
    for pack in env.data_packs() {
        let mut bytes = fs::read(&pack).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x40;
        fs::set_permissions(&pack, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        fs::write(&pack, &bytes).unwrap();
    }
    let (v, code) = verify(&env, &["files", &id, "--sample", "100%"]);
    assert_eq!((code, v["status"].as_str()), (4, Some("failed")), "{v:#}");
    assert!(
        ["restore", "compare"].contains(&failed_step(&v).as_str()),
        "{v:#}"
    );
    assert_eq!(step(&v, "cleanup")["result"], "passed");
    // A share that is not one is refused before anything is recorded.
    let out = env.run(&["verify", "files", &id, "--sample", "0%"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("more than 0%"), "{}", stderr(&out));
    assert_eq!(env.json(&["verify", "list"]).as_array().unwrap().len(), 3);
}
