//! A repository on a Garage cluster: three nodes of the distributed object store on
//! 127.0.0.1 ports, every object on all three (`replication_factor = 3`, quorum 2), and
//! a node killed in the middle of a backup.
//!
//! A slow tier: Garage takes most of an hour to build on two cores, so these tests are
//! ignored by the main suite and run by `scripts/test-garage.sh`, which builds it into
//! `/var/cache/cairn/garage` first. Run that way they fail loudly without it.
//!
//! Garage ignores `If-None-Match` on a PUT (2.5 honours it on GETs only), so the
//! repository URL says `conditional_create=false`: the documented fallback
//! (docs/STORAGE.md).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::dbserver::free_port;
use crate::support::*;

const BUCKET: &str = "backups";

fn garage_bin() -> PathBuf {
    let bin = std::env::var_os("CAIRN_GARAGE").map_or_else(
        || PathBuf::from("/var/cache/cairn/garage/bin/garage"),
        PathBuf::from,
    );
    assert!(
        bin.exists(),
        "{} is missing: scripts/test-garage.sh builds it",
        bin.display()
    );
    bin
}

/// Three Garage nodes; each killed on drop.
struct Cluster {
    bin: PathBuf,
    configs: Vec<PathBuf>,
    nodes: Vec<Option<Child>>,
    s3_ports: Vec<u16>,
    key_id: String,
    secret: String,
}

impl Cluster {
    fn start(dir: &Path) -> Self {
        let bin = garage_bin();
        let secret = blake3::hash(dir.to_string_lossy().as_bytes()).to_hex();
        let mut cluster = Self {
            bin,
            configs: Vec::new(),
            nodes: Vec::new(),
            s3_ports: Vec::new(),
            key_id: String::new(),
            secret: String::new(),
        };
        for i in 0..3 {
            let node = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&node).unwrap();
            let (rpc, s3) = (free_port(), free_port());
            let config = node.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = {meta:?}\ndata_dir = {data:?}\ndb_engine = \"sqlite\"\n\
                     replication_factor = 3\nconsistency_mode = \"consistent\"\n\
                     rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                     rpc_secret = \"{secret}\"\n\n[s3_api]\ns3_region = \"garage\"\n\
                     api_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n",
                    meta = node.join("meta").display().to_string(),
                    data = node.join("data").display().to_string(),
                ),
            )
            .unwrap();
            cluster.configs.push(config);
            cluster.s3_ports.push(s3);
            cluster.nodes.push(None);
            cluster.start_node(i);
        }
        cluster.form();
        cluster
    }

    /// Starts node `i` (again) and waits for its S3 port.
    fn start_node(&mut self, i: usize) {
        let log = std::fs::File::create(self.configs[i].with_file_name("log")).unwrap();
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.configs[i])
            .arg("server")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.nodes[i] = Some(child);
        let port = self.s3_ports[i];
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "garage node {i} did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `garage -c <node 0's config> args…`, which must succeed; its output.
    fn admin(&self, args: &[&str]) -> String {
        self.admin_on(0, args)
    }

    fn admin_on(&self, node: usize, args: &[&str]) -> String {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.configs[node])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "garage {args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Connects the nodes, gives each a role in its own zone, makes a key and a bucket.
    fn form(&mut self) {
        let ids: Vec<String> = (0..3)
            .map(|i| self.admin_on(i, &["node", "id", "-q"]).trim().to_owned())
            .collect();
        for id in &ids[1..] {
            self.admin(&["node", "connect", id]);
        }
        for (i, id) in ids.iter().enumerate() {
            let short = &id[..16];
            self.admin(&[
                "layout",
                "assign",
                "-z",
                &format!("dc{i}"),
                "-c",
                "1G",
                short,
            ]);
        }
        self.admin(&["layout", "apply", "--version", "1"]);
        let key = self.admin(&["key", "create", "cairn"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_else(|| panic!("no {name} in {key}"))
        };
        self.key_id = field("Key ID:");
        self.secret = field("Secret key:");
        self.admin(&["bucket", "create", BUCKET]);
        self.admin(&[
            "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "cairn",
        ]);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// An environment whose repository is `prefix` in the bucket, through node 0.
    fn env(&self, prefix: &str) -> Env {
        let mut env = Env::without_repo();
        env.repo = PathBuf::from(format!(
            "s3://{BUCKET}/{prefix}?endpoint=http://127.0.0.1:{}&region=garage&conditional_create=false",
            self.s3_ports[0]
        ));
        env.extra_env = vec![
            ("AWS_ACCESS_KEY_ID".into(), self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret.clone()),
        ];
        env
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

#[test]
#[ignore = "slow tier: scripts/test-garage.sh (Garage takes most of an hour to build)"]
fn a_garage_cluster_keeps_a_repository_through_a_node_killed_mid_backup() {
    let scratch = Env::without_repo();
    let mut cluster = Cluster::start(&scratch.path("garage"));
    let env = cluster.env("site/repo");
    env.ok(&["init"]);
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..6 {
        write_random(&src.join(format!("f{i}")), 70 + i, 16 << 20);
    }
    std::fs::write(src.join("note"), b"on garage\n").unwrap();

    // Node 2 is killed once the backup has stored something; node 0 (the endpoint) and
    // node 1 still make a quorum of two, so the backup must complete.
    let child = env
        .cmd()
        .args(["--json", "backup", src.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let data = scratch.path("garage/node2/data");
    let deadline = Instant::now() + Duration::from_secs(120);
    while dir_bytes(&data) < 8 << 20 {
        assert!(Instant::now() < deadline, "no data reached node 2");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut child = child;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the backup ended before node 2 was killed"
    );
    cluster.kill(2);
    let out = child.wait_with_output().unwrap();
    eprintln!("backup with node 2 killed midway: {}", stderr(&out));
    assert!(
        out.status.success(),
        "the backup failed with one node of three down: {}",
        stderr(&out)
    );

    // With two nodes: restore byte for byte, and the repository checks.
    env.assert_latest_restores(&src, "restored");
    env.assert_checks_clean();

    // Node 2 back: a second backup, and the mount reads a file through the cluster.
    cluster.start_node(2);
    write_random(&src.join("f0"), 99, 16 << 20);
    env.backup(&[&src]);
    if require_fuse("garage mount") {
        let mnt = env.path("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        env.ok(&["mount", mnt.to_str().unwrap(), "--daemon"]);
        // `<time>-<id>`: the last by name is the newest.
        let mut snaps: Vec<_> = std::fs::read_dir(mnt.join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        snaps.sort();
        let snap = snaps.pop().unwrap();
        let f0 = under(&snap, &src).join("f0");
        let read = std::panic::catch_unwind(|| hash_file(&f0));
        let unmounted = Command::new("fusermount").arg("-u").arg(&mnt).status();
        assert_eq!(read.ok(), Some(hash_file(&src.join("f0"))));
        assert!(unmounted.unwrap().success());
    }
    env.assert_checks_clean();
}
