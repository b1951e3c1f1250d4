//! Virtual machines through a real libvirtd (`qemu:///system`) with real guests under
//! TCG: the test guest of scripts/make-test-guest.sh (its system on its disk, the QEMU
//! guest agent running). Data is written inside the guest through the agent, backed up
//! with `repo backup --vm`, and checked in restored disks (loop-mounted read-only) and in
//! recovered copies (through their own agent).
//!
//! The tests take turns (one guest at a time: TCG is slow, and one test restarts
//! libvirtd).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;

const URI: &str = "qemu:///system";

fn guest_dir() -> PathBuf {
    PathBuf::from(
        std::env::var_os("CAIRN_TEST_GUEST")
            .unwrap_or_else(|| "/var/cache/cairn/test-guest".into()),
    )
}

/// One VM test at a time.
pub(crate) fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .unwrap()
}

pub(crate) fn virsh_ok(args: &[&str]) -> String {
    succeeded(&format!("virsh {args:?}"), virsh(args))
}

/// Whether libvirt and the test guest are there; in CI their absence fails the test.
pub(crate) fn have_libvirt(what: &str) -> bool {
    let ok = is_root()
        && virsh(&["version"]).status.success()
        && guest_dir().join("disk.qcow2").exists();
    require(
        ok,
        what,
        "libvirtd answering on qemu:///system (scripts/start-services.sh) and the test guest (scripts/make-test-guest.sh), as root",
    )
}

/// A test guest: its own copy of the guest disk, a domain of its own, removed when
/// dropped (with its checkpoints).
pub(crate) struct TestVm {
    pub(crate) name: String,
    dir: PathBuf,
}

impl TestVm {
    /// Defines a guest named `cairn-t-<tag>-<random>`; `extra_disks` are blank qcow2
    /// disks (vdb, vdc, ...) of 64 MiB.
    pub(crate) fn define(tag: &str, extra_disks: usize) -> Self {
        let rand = format!("{:08x}", rand32());
        let name = format!("cairn-t-{tag}-{rand}");
        let dir = PathBuf::from("/var/tmp/cairn-vm-tests").join(&name);
        fs::create_dir_all(&dir).unwrap();
        for p in [Path::new("/var/tmp/cairn-vm-tests"), &dir] {
            set_mode(p, 0o755);
        }
        let disk = dir.join("vda.qcow2");
        fs::copy(guest_dir().join("disk.qcow2"), &disk).unwrap();
        let mut disks = disk_xml(&disk, "vda");
        for i in 0..extra_disks {
            let t = format!("vd{}", (b'b' + i as u8) as char);
            let p = dir.join(format!("{t}.qcow2"));
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&p)
                .arg("64M"));
            disks.push_str(&disk_xml(&p, &t));
        }
        let g = guest_dir();
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{k}</kernel><initrd>{i}</initrd>\
             <cmdline>console=ttyS0</cmdline></os><features><acpi/><apic/></features><devices>{disks}\
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             <serial type='file'><source path='{log}'/><target port='0'/></serial></devices></domain>",
            k = g.join("vmlinuz").display(),
            i = g.join("initrd.img").display(),
            log = dir.join("console.log").display(),
        );
        let file = dir.join("domain.xml");
        fs::write(&file, xml).unwrap();
        virsh_ok(&["define", file.to_str().unwrap()]);
        Self { name, dir }
    }

    /// Defines and starts a guest, and waits for its agent.
    pub(crate) fn boot(tag: &str, extra_disks: usize) -> Self {
        let vm = Self::define(tag, extra_disks);
        vm.start();
        vm
    }

    fn start(&self) {
        virsh_ok(&["start", &self.name]);
        wait_agent(&self.name);
    }

    fn disk(&self) -> PathBuf {
        self.dir.join("vda.qcow2")
    }

    /// Runs `script` in the guest (sh -c) through its agent; returns its stdout.
    pub(crate) fn exec(&self, script: &str) -> String {
        guest_exec(&self.name, script)
    }

    /// Writes `mib` MiB of random data to `/data/<name>` in the guest, synced; returns
    /// its SHA-256 as the guest computes it.
    pub(crate) fn write(&self, name: &str, mib: u32) -> String {
        self.exec(&format!(
            "dd if=/dev/urandom of=/data/{name} bs=1M count={mib} 2>/dev/null; sync; sha256sum /data/{name}"
        ))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
    }

    fn state(&self) -> String {
        virsh_ok(&["domstate", &self.name]).trim().to_owned()
    }

    /// Shuts down from inside the guest and waits for it to be off.
    fn poweroff_inside(&self) {
        let _ = virsh(&[
            "qemu-agent-command",
            &self.name,
            r#"{"execute":"guest-exec","arguments":{"path":"/sbin/poweroff"}}"#,
        ]);
        self.wait_off();
    }

    fn wait_off(&self) {
        let start = Instant::now();
        while self.state() != "shut off" {
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "{} did not power off",
                self.name
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&[
            "undefine",
            &self.name,
            "--checkpoints-metadata",
            "--managed-save",
            "--snapshots-metadata",
        ]);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn disk_xml(path: &Path, target: &str) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/>\
         <target dev='{target}' bus='virtio'/></disk>",
        path.display()
    )
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn rand32() -> u32 {
    let mut b = [0u8; 4];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    u32::from_le_bytes(b)
}

pub(crate) fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    succeeded(&format!("{cmd:?}"), out)
}

pub(crate) fn wait_agent(name: &str) {
    let start = Instant::now();
    loop {
        if virsh(&["qemu-agent-command", name, r#"{"execute":"guest-ping"}"#])
            .status
            .success()
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{name}: the guest agent never answered"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `sh -c script` in the guest; its stdout.
pub(crate) fn guest_exec(name: &str, script: &str) -> String {
    let cmd = serde_json::json!({
        "execute": "guest-exec",
        "arguments": {"path": "/bin/sh", "arg": ["-c", script], "capture-output": true},
    })
    .to_string();
    let out: Value = serde_json::from_str(&virsh_ok(&["qemu-agent-command", name, &cmd])).unwrap();
    let pid = out["return"]["pid"].as_i64().unwrap();
    let start = Instant::now();
    loop {
        let status = serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}})
            .to_string();
        let s: Value =
            serde_json::from_str(&virsh_ok(&["qemu-agent-command", name, &status])).unwrap();
        if s["return"]["exited"] == true {
            let data = s["return"]["out-data"].as_str().unwrap_or("");
            return String::from_utf8(base64_decode(data)).unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{name}: {script} did not finish"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let Some(v) = A.iter().position(|&x| x == c) else {
            continue;
        };
        buf = (buf << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    out
}

/// A repository for VM tests: its host state where QEMU's user can reach session files.
pub(crate) fn vm_env() -> Env {
    let env = Env::new();
    set_mode(env.dir.path(), 0o711);
    env
}

/// `repo backup --vm NAME --json` (and extra args): the VM report and the snapshot.
pub(crate) fn backup(env: &Env, vm: &str, extra: &[&str]) -> (Value, Value) {
    let mut args = vec!["backup", "--vm", vm];
    args.extend_from_slice(extra);
    let v = env.json(&args);
    (v["vms"][0].clone(), v["snapshot"].clone())
}

/// The SHA-256 of `/data/<name>` in the disk of snapshot `id`, restored and
/// loop-mounted read-only (`None` when the file is not there).
fn file_in_restore(env: &Env, id: &str, disk: &str, name: &str) -> Option<String> {
    let t = env.path(&format!("restore-{}", &id[..8]));
    let _ = fs::remove_dir_all(&t);
    env.ok(&["restore", id, "--target", t.to_str().unwrap()]);
    let mnt = env.path("loop");
    fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-o", "loop,ro,noload"])
        .arg(t.join(format!("{disk}.raw")))
        .arg(&mnt));
    let sum = fs::read(mnt.join("data").join(name))
        .ok()
        .map(|b| sha256(&b));
    run(Command::new("umount").arg(&mnt));
    let _ = fs::remove_dir_all(&t);
    sum
}

fn sha256(b: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn disk_report(report: &Value, target: &str) -> Value {
    report["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["target"] == target)
        .cloned()
        .unwrap_or_else(|| panic!("no disk {target} in {report}"))
}

#[test]
fn a_running_vm_is_backed_up_frozen_incrementally_and_restores_what_its_guest_wrote() {
    if !have_libvirt("VM backups") {
        return;
    }
    let _turn = turn();
    let env = vm_env();
    let vm = TestVm::boot("run", 0);
    let a = vm.write("a", 4);
    let (full, snap1) = backup(&env, &vm.name, &[]);
    assert!(full["running"] == true, "{full}");
    assert!(
        full["consistency"].as_str().unwrap().starts_with("frozen"),
        "{full}"
    );
    let vda = disk_report(&full, "vda");
    assert_eq!(vda["incremental"], false);
    assert!(
        vda["bytes_read"].as_u64().unwrap() < 64 << 20,
        "zeros were read: {vda}"
    );
    let snap1 = snap1["id"].as_str().unwrap().to_owned();
    // 2 MiB written: the incremental reads about that, not the 256 MiB disk.
    let b = vm.write("b", 2);
    let (inc, snap2) = backup(&env, &vm.name, &[]);
    let vda = disk_report(&inc, "vda");
    assert_eq!(vda["incremental"], true, "{inc}");
    let read = vda["bytes_read"].as_u64().unwrap();
    eprintln!(
        "incremental after a 2 MiB write: {read} bytes read of {}",
        vda["size"]
    );
    assert!((2 << 20..16 << 20).contains(&read), "{inc}");
    let snap2 = snap2["id"].as_str().unwrap().to_owned();
    // The guest is not left frozen.
    assert!(!vm.write("after", 1).is_empty());
    // One checkpoint left: the chain stays short.
    let cps = virsh_ok(&["checkpoint-list", &vm.name, "--name"]);
    assert_eq!(
        cps.lines().filter(|l| l.starts_with("cairn-")).count(),
        1,
        "{cps}"
    );
    // Restored disks hold what the guest wrote.
    assert_eq!(file_in_restore(&env, &snap2, "vda", "a"), Some(a.clone()));
    assert_eq!(file_in_restore(&env, &snap2, "vda", "b"), Some(b));
    assert_eq!(file_in_restore(&env, &snap1, "vda", "a"), Some(a));
    assert_eq!(file_in_restore(&env, &snap1, "vda", "b"), None);
    // The domain's XML is in the snapshot; the listing knows the VM.
    let ls = env.ok(&["ls", &snap2]);
    assert!(ls.contains("domain.xml") && ls.contains("vda.raw"), "{ls}");
    let list = env.json(&["vm", "list"]);
    let me = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == vm.name.as_str())
        .unwrap();
    assert_eq!(me["last_snapshot"], snap2.as_str());
    assert_eq!(me["changed_block_tracking_ready"], true, "{me}");
    env.ok(&["check", "--read-data"]);
}

#[test]
fn changed_block_tracking_survives_power_off_managedsave_and_a_libvirtd_restart() {
    if !have_libvirt("changed-block tracking across power-off") {
        return;
    }
    let _turn = turn();
    let env = vm_env();
    let vm = TestVm::boot("cbt", 0);
    vm.write("base", 3);
    backup(&env, &vm.name, &[]);
    // Shut down from inside the guest: the stopped backup reads the bitmap, not the disk.
    vm.poweroff_inside();
    let (stopped, _) = backup(&env, &vm.name, &[]);
    assert_eq!(stopped["running"], false);
    let vda = disk_report(&stopped, "vda");
    assert_eq!(vda["incremental"], true, "{stopped}");
    assert!(vda["bytes_read"].as_u64().unwrap() < 8 << 20, "{stopped}");
    // Back up, then a change: only it is read.
    vm.start();
    let c = vm.write("c", 2);
    let (after_boot, snap) = backup(&env, &vm.name, &[]);
    let vda = disk_report(&after_boot, "vda");
    assert_eq!(vda["incremental"], true, "{after_boot}");
    assert!(
        vda["bytes_read"].as_u64().unwrap() < 16 << 20,
        "{after_boot}"
    );
    assert_eq!(
        file_in_restore(&env, snap["id"].as_str().unwrap(), "vda", "c"),
        Some(c)
    );
    // managedsave (as libvirt-guests does at host shutdown), libvirtd restarted, started.
    virsh_ok(&["managedsave", &vm.name]);
    restart_libvirtd();
    virsh_ok(&["start", &vm.name]);
    wait_agent(&vm.name);
    let d = vm.write("d", 2);
    let (resumed, snap) = backup(&env, &vm.name, &[]);
    let vda = disk_report(&resumed, "vda");
    assert_eq!(vda["incremental"], true, "{resumed}");
    assert!(vda["bytes_read"].as_u64().unwrap() < 16 << 20, "{resumed}");
    assert_eq!(
        file_in_restore(&env, snap["id"].as_str().unwrap(), "vda", "d"),
        Some(d)
    );
    env.ok(&["check", "--read-data"]);
}

fn restart_libvirtd() {
    let _ = Command::new("pkill").args(["-x", "libvirtd"]).status();
    let start = Instant::now();
    while Command::new("pgrep")
        .args(["-x", "libvirtd"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "libvirtd did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(Command::new("libvirtd")
        .arg("-d")
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    while !virsh(&["version"]).status.success() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "libvirtd did not come back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_crash_a_deleted_checkpoint_a_removed_bitmap_and_a_new_disk_each_mean_a_full_read() {
    if !have_libvirt("falling back to full reads") {
        return;
    }
    let _turn = turn();
    let env = vm_env();
    let vm = TestVm::boot("fallback", 0);
    let x = vm.write("x", 2);
    backup(&env, &vm.name, &[]);
    // `virsh destroy` lets QEMU close the image: its bitmap stays trustworthy.
    virsh_ok(&["destroy", &vm.name]);
    let (after_destroy, _) = backup(&env, &vm.name, &[]);
    assert_eq!(
        disk_report(&after_destroy, "vda")["incremental"],
        true,
        "{after_destroy}"
    );
    // A QEMU killed with the image open leaves its bitmaps marked in use.
    vm.start();
    let y = vm.write("y", 2);
    let pid = fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", vm.name)).unwrap();
    run(Command::new("kill").args(["-9", pid.trim()]));
    vm.wait_off();
    let (after_crash, snap) = backup(&env, &vm.name, &[]);
    let vda = disk_report(&after_crash, "vda");
    assert_eq!(vda["incremental"], false, "{after_crash}");
    assert!(
        vda["note"].as_str().unwrap().contains("in use"),
        "{after_crash}"
    );
    let id = snap["id"].as_str().unwrap().to_owned();
    assert_eq!(file_in_restore(&env, &id, "vda", "x"), Some(x));
    // The write the guest had synced before the kill is there.
    assert_eq!(file_in_restore(&env, &id, "vda", "y"), Some(y));
    // A checkpoint deleted behind our back.
    vm.start();
    let cp = virsh_ok(&["checkpoint-list", &vm.name, "--name"]);
    virsh_ok(&[
        "checkpoint-delete",
        &vm.name,
        cp.lines().find(|l| l.starts_with("cairn-")).unwrap(),
    ]);
    let (no_cp, _) = backup(&env, &vm.name, &[]);
    let vda = disk_report(&no_cp, "vda");
    assert_eq!(vda["incremental"], false, "{no_cp}");
    assert!(
        vda["note"].as_str().unwrap().contains("gone from libvirt"),
        "{no_cp}"
    );
    // A bitmap removed from the stopped disk behind our back.
    vm.poweroff_inside();
    let cp = virsh_ok(&["checkpoint-list", &vm.name, "--name"]);
    let cp = cp
        .lines()
        .find(|l| l.starts_with("cairn-"))
        .unwrap()
        .to_owned();
    run(Command::new("qemu-img")
        .args(["bitmap", "--remove"])
        .arg(vm.disk())
        .arg(&cp));
    let (no_bitmap, _) = backup(&env, &vm.name, &[]);
    let vda = disk_report(&no_bitmap, "vda");
    assert_eq!(vda["incremental"], false, "{no_bitmap}");
    assert!(
        vda["note"].as_str().unwrap().contains("gone from the disk"),
        "{no_bitmap}"
    );
    // --full reads the whole disk whatever the bitmaps say.
    let (full, _) = backup(&env, &vm.name, &["--full"]);
    assert_eq!(disk_report(&full, "vda")["incremental"], false);
    env.ok(&["check", "--read-data"]);
}

#[test]
fn a_disk_added_later_is_read_whole_and_both_restore() {
    if !have_libvirt("an added disk") {
        return;
    }
    let _turn = turn();
    let env = vm_env();
    let vm = TestVm::boot("adddisk", 0);
    backup(&env, &vm.name, &[]);
    // A disk added to the (stopped) domain's definition.
    vm.poweroff_inside();
    let extra = vm.dir.join("vdb.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&extra)
        .arg("32M"));
    let xml = vm.dir.join("vdb.xml");
    fs::write(&xml, disk_xml(&extra, "vdb")).unwrap();
    virsh_ok(&["attach-device", &vm.name, xml.to_str().unwrap(), "--config"]);
    vm.start();
    // Known data on the new disk, from inside the guest.
    vm.exec(
        "printf 'new disk data' | dd of=/dev/vdb bs=512 seek=100 conv=notrunc 2>/dev/null; sync",
    );
    let (r, snap) = backup(&env, &vm.name, &[]);
    assert_eq!(disk_report(&r, "vda")["incremental"], true, "{r}");
    let vdb = disk_report(&r, "vdb");
    assert_eq!(vdb["incremental"], false, "{r}");
    assert!(
        vdb["note"].as_str().unwrap().contains("does not have"),
        "{r}"
    );
    let t = env.path("two");
    env.ok(&[
        "restore",
        snap["id"].as_str().unwrap(),
        "--target",
        t.to_str().unwrap(),
    ]);
    let raw = fs::read(t.join("vdb.raw")).unwrap();
    assert_eq!(raw.len(), 32 << 20);
    assert_eq!(&raw[100 * 512..100 * 512 + 13], b"new disk data");
}

#[test]
fn the_guest_agent_freezes_when_it_answers_and_quiesce_requires_it() {
    if !have_libvirt("freeze and thaw") {
        return;
    }
    let _turn = turn();
    let env = vm_env();
    let vm = TestVm::boot("agent", 0);
    let (r, _) = backup(&env, &vm.name, &["--quiesce"]);
    assert!(
        r["consistency"].as_str().unwrap().starts_with("frozen"),
        "{r}"
    );
    // An agent that hangs (stopped): the backup goes on crash-consistent, in bounded
    // time, and says so; --quiesce refuses.
    let _ = virsh(&[
        "qemu-agent-command",
        &vm.name,
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","sleep 1; kill -STOP $(pidof qemu-ga)"]}}"#,
    ]);
    std::thread::sleep(Duration::from_secs(3));
    let started = Instant::now();
    let (r, snap) = backup(&env, &vm.name, &[]);
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "a hung agent hung the backup"
    );
    assert!(
        r["consistency"]
            .as_str()
            .unwrap()
            .starts_with("crash-consistent"),
        "{r}"
    );
    assert!(snap["meta"]["vm.consistency"]
        .as_str()
        .unwrap()
        .starts_with("crash-consistent"));
    let out = env.run(&["backup", "--vm", &vm.name, "--quiesce"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("guest agent"), "{}", stderr(&out));
}

#[test]
fn a_killed_backup_leaves_no_job_and_the_next_backup_and_cleanup_end_it() {
    if !have_libvirt("killed VM backups") {
        return;
    }
    let _turn = turn();
    let env = vm_env();
    let vm = TestVm::boot("kill", 0);
    vm.write("k", 8);
    // Killed by a storage crash point, while the backup job runs (its packs being written).
    for (round, then) in [(0, "cleanup"), (1, "backup")] {
        let out = env
            .cmd()
            .env("CAIRN_TESTONLY_CRASH_AT", "6")
            .args(["backup", "--vm", &vm.name])
            .output()
            .unwrap();
        assert!(
            out.status.code().is_none(),
            "round {round}: not killed: {}",
            stderr(&out)
        );
        let job = virsh_ok(&["domjobinfo", &vm.name]);
        assert!(
            job.contains("Backup"),
            "round {round}: no job left to end: {job}"
        );
        if then == "cleanup" {
            let r = env.json(&["vm", "cleanup"]);
            assert!(
                r["jobs_ended"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|n| n == vm.name.as_str()),
                "{r}"
            );
        } else {
            let (r, _) = backup(&env, &vm.name, &[]);
            assert!(r["disks"].is_array());
        }
        let job = virsh_ok(&["domjobinfo", &vm.name]);
        assert!(
            !job.contains("Backup"),
            "round {round}: a job is left: {job}"
        );
    }
    env.ok(&["check", "--read-data"]);
}

#[test]
fn a_recovered_vm_boots_with_the_backed_up_content_writes_to_its_overlay_and_promotes() {
    if !have_libvirt("recovering VMs") {
        return;
    }
    let _turn = turn();
    let env = vm_env();
    let vm = TestVm::boot("recover", 0);
    let m = vm.write("marker", 2);
    let (_, snap) = backup(&env, &vm.name, &[]);
    let id = snap["id"].as_str().unwrap().to_owned();
    virsh_ok(&["destroy", &vm.name]);
    // The copy: a new name, the backed-up content, its own writes in its overlay.
    let started = Instant::now();
    let s = env.json(&["recover", "vm", &id]);
    let copy = s["domain"].as_str().unwrap().to_owned();
    wait_agent(&copy);
    eprintln!(
        "recover vm to a guest agent answering: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let got = guest_exec(&copy, "sha256sum /data/marker");
    assert!(got.starts_with(&m), "{got}");
    assert!(
        !virsh_ok(&["dumpxml", &copy]).contains("<interface"),
        "the copy has a network"
    );
    guest_exec(&copy, "echo changed > /data/marker; sync");
    env.ok(&["check", "--read-data"]);
    // A second session sees the original.
    let s2 = env.json(&["recover", "vm", &id, "--name", &format!("{}-2", vm.name)]);
    let copy2 = s2["domain"].as_str().unwrap().to_owned();
    wait_agent(&copy2);
    assert!(guest_exec(&copy2, "sha256sum /data/marker").starts_with(&m));
    env.ok(&["recover", "stop", s2["id"].as_str().unwrap()]);
    assert!(
        !virsh(&["dominfo", &copy2]).status.success(),
        "the domain is still defined"
    );
    // Promote: the copy moves to its own disks and keeps running without the session.
    let to = env.path("promoted");
    let p = env.json(&[
        "recover",
        "promote",
        s["id"].as_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
    ]);
    let dir = PathBuf::from(s["dir"].as_str().unwrap());
    assert!(!dir.exists(), "the session's directory is still there");
    assert!(!mounted_at(&dir.join("mnt")));
    assert!(env
        .json(&["recover", "list"])
        .as_array()
        .unwrap()
        .is_empty());
    wait_agent(&copy);
    assert_eq!(guest_exec(&copy, "cat /data/marker").trim(), "changed");
    // Its disk is complete: a new file written after promote, then the promoted disk,
    // loop-mounted once the VM is off, holds the backed-up and the new data.
    guest_exec(&copy, "echo after > /data/after; sync");
    virsh_ok(&["destroy", &copy]);
    let disk = PathBuf::from(p["disks"][0][1].as_str().unwrap());
    run(Command::new("qemu-img").arg("check").arg(&disk));
    let raw = env.path("promoted.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&disk)
        .arg(&raw));
    let mnt = env.path("pm");
    fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-o", "loop,ro,noload"])
        .arg(&raw)
        .arg(&mnt));
    let after = fs::read_to_string(mnt.join("data/after"));
    let marker = fs::read_to_string(mnt.join("data/marker"));
    run(Command::new("umount").arg(&mnt));
    assert_eq!(after.unwrap().trim(), "after");
    assert_eq!(marker.unwrap().trim(), "changed");
    let _ = virsh(&["undefine", &copy, "--checkpoints-metadata"]);
    // Nothing of the sessions is left.
    let r = env.json(&["recover", "cleanup"]);
    assert!(r["sessions_removed"].as_array().unwrap().is_empty(), "{r}");
}

#[test]
fn a_vm_snapshot_restores_as_a_new_domain_that_boots() {
    if !have_libvirt("restoring VMs") {
        return;
    }
    let _turn = turn();
    let env = vm_env();
    let vm = TestVm::boot("restore", 0);
    let m = vm.write("m", 1);
    let (_, snap) = backup(&env, &vm.name, &[]);
    virsh_ok(&["destroy", &vm.name]);
    let name = format!("{}-restored", vm.name);
    let to = vm.dir.join("restored");
    // The original's name is taken: refused.
    let out = env.run(&[
        "restore",
        snap["id"].as_str().unwrap(),
        "--vm",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("exists already"), "{}", stderr(&out));
    env.ok(&[
        "restore",
        snap["id"].as_str().unwrap(),
        "--vm",
        "--name",
        &name,
        "--to",
        to.to_str().unwrap(),
    ]);
    struct Undefine(String);
    impl Drop for Undefine {
        fn drop(&mut self) {
            let _ = virsh(&["destroy", &self.0]);
            let _ = virsh(&["undefine", &self.0]);
        }
    }
    let _gone = Undefine(name.clone());
    let xml = virsh_ok(&["dumpxml", &name]);
    let original = virsh_ok(&["domuuid", &vm.name]);
    assert!(
        !xml.contains(original.trim()),
        "the restored domain has the original's UUID: {xml}"
    );
    assert!(
        !xml.contains(vm.disk().to_str().unwrap()),
        "the restored domain uses the original's disk: {xml}"
    );
    assert!(xml.contains(to.to_str().unwrap()), "{xml}");
    env.ok(&["vm", "start", &name]);
    wait_agent(&name);
    assert!(guest_exec(&name, "sha256sum /data/m").starts_with(&m));
    // Hypervisor operations, with clear errors.
    let out = env.run(&["vm", "start", &name]);
    assert!(stderr(&out).contains("already running"), "{}", stderr(&out));
    env.ok(&["vm", "stop", &name]);
    assert_eq!(virsh_ok(&["domstate", &name]).trim(), "shut off");
    let out = env.run(&["vm", "stop", &name]);
    assert!(stderr(&out).contains("not running"), "{}", stderr(&out));
}

#[test]
fn bad_vm_input_is_refused_clearly_and_makes_no_snapshot() {
    if !have_libvirt("bad VM input") {
        return;
    }
    let _turn = turn();
    let env = vm_env();
    let count = || env.json(&["snapshots"]).as_array().unwrap().len();
    let out = env.run(&["backup", "--vm", "no-such-vm-here"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no domain named"), "{}", stderr(&out));
    let out = env.run(&[
        "backup",
        "--vm",
        "x",
        "--connect",
        "qemu+unix:///system?socket=/nonexistent/sock",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not reachable"), "{}", stderr(&out));
    // A network disk (RBD) cannot be read here: no snapshot of half a VM.
    let vm = TestVm::define("rbd", 0);
    let rbd = vm.dir.join("rbd.xml");
    fs::write(
        &rbd,
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
         <source protocol='rbd' name='pool/image'><host name='127.0.0.1' port='6789'/></source>\
         <target dev='vdb' bus='virtio'/></disk>",
    )
    .unwrap();
    virsh_ok(&["attach-device", &vm.name, rbd.to_str().unwrap(), "--config"]);
    let out = env.run(&["backup", "--vm", &vm.name]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("network disk (rbd)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(count(), 0);
    // Not a VM's snapshot.
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "x").unwrap();
    let id = env.backup(&[&src])["id"].as_str().unwrap().to_owned();
    let out = env.run(&["recover", "vm", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not a VM"), "{}", stderr(&out));
    let out = env.run(&["restore", &id, "--vm", "--name", "x", "--to", "/tmp/x"]);
    assert!(stderr(&out).contains("not a VM"), "{}", stderr(&out));
    let out = env.run(&["vm", "start", "no-such-vm-here"]);
    assert!(stderr(&out).contains("no domain named"), "{}", stderr(&out));
}

#[test]
fn a_vm_is_listed_powered_off_started_and_recovered_through_the_api() {
    use crate::serve::{serve_config, token, Api, Daemon};
    if !have_libvirt("the API's VM operations") {
        return;
    }
    let _turn = turn();
    let env = vm_env();
    let vm = TestVm::boot("api", 0);
    let m = vm.write("marker", 1);
    let config = serve_config(&env, "");
    let rw = token(&env, &config, "admin", false);
    let d = Daemon::start(&env, &config);
    let admin = Api {
        base: &d.url,
        token: Some(&rw),
    };
    let (s, v) = admin.get("/api/v1/vms");
    assert_eq!(s, 200, "{v}");
    let listed = v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == vm.name.as_str())
        .unwrap_or_else(|| panic!("{} is not listed: {v}", vm.name))
        .clone();
    assert_eq!(listed["state"], "running", "{listed}");
    assert_eq!(listed["disks"][0]["target"], "vda", "{listed}");
    let (s, v) = admin.post(&format!("/api/v1/vms/{}/start", vm.name), &json!({}));
    assert_eq!(s, 409, "{v}");
    let (s, v) = admin.post(&format!("/api/v1/vms/{}/power_off", vm.name), &json!({}));
    assert_eq!(s, 200, "{v}");
    assert_eq!(vm.state(), "shut off");
    let (s, v) = admin.post(&format!("/api/v1/vms/{}/start", vm.name), &json!({}));
    assert_eq!(s, 200, "{v}");
    wait_agent(&vm.name);
    // A backup, then its recovery through the API: a new domain that boots with the
    // backed-up file, stopped through the API with nothing left.
    let (_, snap) = backup(&env, &vm.name, &[]);
    let (s, v) = admin.post(
        "/api/v1/recovery/vm",
        &json!({ "snapshot": snap["id"], "network": "none" }),
    );
    assert_eq!(s, 201, "{v}\n{}", d.log());
    let copy = v["domain"].as_str().unwrap().to_owned();
    let session = v["session"]["id"].as_str().unwrap().to_owned();
    wait_agent(&copy);
    assert!(guest_exec(&copy, "sha256sum /data/marker").starts_with(&m));
    let (s, v) = admin.post(&format!("/api/v1/recovery/{session}/stop"), &json!({}));
    assert_eq!(s, 200, "{v}");
    assert!(
        !virsh(&["dominfo", &copy]).status.success(),
        "the recovered domain is still defined"
    );
    // A full restore as a new domain (defined, not started), its disks where asked.
    let clone = format!("{}-clone", vm.name);
    let to = env.path("clone");
    let (s, v) = admin.post(
        "/api/v1/vms/clone",
        &json!({ "snapshot": snap["id"], "name": clone, "to": to }),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["restored"]["domain"], clone.as_str(), "{v}");
    let disk = PathBuf::from(v["restored"]["disks"][0][1].as_str().unwrap());
    assert!(disk.starts_with(&to) && disk.exists(), "{v}");
    assert_eq!(virsh_ok(&["domstate", &clone]).trim(), "shut off");
    let (s, v) = admin.post(
        "/api/v1/vms/clone",
        &json!({ "snapshot": snap["id"], "name": clone, "to": to }),
    );
    assert_eq!(s, 502, "a second clone of the same name: {v}");
    let _ = virsh(&["undefine", &clone]);
    let (s, v) = admin.get(&format!("/api/v1/vms/{}/snapshots", vm.name));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["snapshots"], json!([]), "{v}");
    let (s, v) = admin.call(
        "DELETE",
        &format!("/api/v1/vms/{}/snapshots/nope", vm.name),
        None,
    );
    assert_eq!(s, 404, "{v}");
    let r = env.json(&["recover", "cleanup"]);
    assert!(r["sessions_removed"].as_array().unwrap().is_empty(), "{r}");
}
