//! Throwaway database servers for the tests: PostgreSQL 15 and MariaDB clusters on
//! private sockets and ports, and what the recovery tests need around them (Docker).

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::support::{require, Env};

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A PostgreSQL server run as the `postgres` user on `data`, stopped when dropped.
pub struct Postgres {
    child: std::process::Child,
    pub sock: std::path::PathBuf,
    pub port: u16,
    pub log: std::path::PathBuf,
}

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub fn postgres_user() -> (u32, u32) {
    let u = nix::unistd::User::from_name("postgres")
        .unwrap()
        .expect("a postgres user");
    (u.uid.as_raw(), u.gid.as_raw())
}

pub fn as_postgres(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    let (uid, gid) = postgres_user();
    cmd.uid(uid).gid(gid).env("LC_ALL", "C.UTF-8")
}

impl Postgres {
    pub fn start(env: &Env, data: &Path, tag: &str) -> Self {
        let sock = env.path(&format!("sock-{tag}"));
        fs::create_dir_all(&sock).unwrap();
        let (uid, gid) = postgres_user();
        std::os::unix::fs::chown(&sock, Some(uid), Some(gid)).unwrap();
        let port = free_port();
        let log = env.path(&format!("postgres-{tag}.log"));
        let child = as_postgres(&mut Command::new(format!("{PG_BIN}/postgres")))
            .arg("-D")
            .arg(data)
            .args([
                "-k",
                sock.to_str().unwrap(),
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
            ])
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let pg = Self {
            child,
            sock,
            port,
            log,
        };
        let start = std::time::Instant::now();
        loop {
            let ready = Command::new(format!("{PG_BIN}/pg_isready"))
                .args(["-h", pg.sock.to_str().unwrap(), "-p", &pg.port.to_string()])
                .output()
                .unwrap();
            if ready.status.success() {
                break;
            }
            assert!(
                start.elapsed().as_secs() < 60,
                "postgres did not start: {}",
                fs::read_to_string(&pg.log).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        pg
    }

    pub fn sql(&self, q: &str) -> String {
        let out = as_postgres(&mut Command::new("psql"))
            .args([
                "-h",
                self.sock.to_str().unwrap(),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-At",
                "-c",
                q,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{q}: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(&self.log).unwrap_or_default()
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    pub fn stop(mut self) -> String {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let status = self.child.wait().unwrap();
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        assert!(status.success(), "postgres exited with {status}: {log}");
        log
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Postgres {
    /// A libpq connection string for the server's socket.
    pub fn conn(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.sock.display(),
            self.port
        )
    }
}

/// True when Docker runs and has `image`; in CI a missing one is a failure.
pub fn require_docker(image: &str) -> bool {
    let ok = Command::new("docker")
        .args(["image", "inspect", image])
        .output()
        .is_ok_and(|o| o.status.success());
    require(
        ok,
        &format!("a test with the image {image}"),
        &format!("Docker and {image} (start dockerd, run scripts/build-db-images.sh)"),
    )
}

/// A MariaDB server run as `mysql` on a fresh data directory, stopped when dropped.
pub struct Mariadb {
    child: std::process::Child,
    pub sock: std::path::PathBuf,
    pub log: std::path::PathBuf,
}

impl Mariadb {
    pub fn start(env: &Env, tag: &str) -> Self {
        let base = env.path(&format!("mariadb-{tag}"));
        let (data, run) = (base.join("data"), base.join("run"));
        fs::create_dir_all(&run).unwrap();
        let mysql = nix::unistd::User::from_name("mysql")
            .unwrap()
            .expect("a mysql user (apt-get install mariadb-server)");
        std::os::unix::fs::chown(&run, Some(mysql.uid.as_raw()), Some(mysql.gid.as_raw())).unwrap();
        let out = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--user=mysql", "--skip-test-db"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mariadb-install-db: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sock = run.join("mysqld.sock");
        let port = free_port();
        let log = base.join("server.log");
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", sock.display()))
            .arg(format!("--port={port}"))
            .args(["--user=mysql", "--bind-address=127.0.0.1", "--skip-log-bin"])
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let m = Self { child, sock, log };
        let start = std::time::Instant::now();
        while m.try_sql("SELECT 1").is_err() {
            assert!(
                start.elapsed().as_secs() < 60,
                "mariadbd did not start: {}",
                fs::read_to_string(&m.log).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        m
    }

    pub fn try_sql(&self, q: &str) -> Result<String, String> {
        let out = Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.sock.display()))
            .args(["-uroot", "-N", "-B", "-e", q])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8(out.stdout).unwrap().trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn sql(&self, q: &str) -> String {
        self.try_sql(q).unwrap_or_else(|e| panic!("{q}: {e}"))
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// A PostgreSQL 15 cluster made with initdb (trust) under `env` and started.
pub fn postgres_cluster(env: &Env, tag: &str) -> Postgres {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (uid, gid) = postgres_user();
    let data = env.path(&format!("pg-{tag}"));
    fs::create_dir_all(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
    let out = as_postgres(&mut Command::new(format!("{PG_BIN}/initdb")))
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Postgres::start(env, &data, tag)
}

/// Whether PostgreSQL 15 is here; in CI its absence is a failure.
pub fn require_postgres() -> bool {
    require(
        Path::new(PG_BIN).join("postgres").exists(),
        "a PostgreSQL test",
        &format!("PostgreSQL 15 ({PG_BIN})"),
    )
}
