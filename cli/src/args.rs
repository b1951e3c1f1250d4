//! The command line: every command, option and its help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "repo",
    version,
    about = "cairn: deduplicating, encrypted backups of file trees and streams",
    after_help = "Repository: --repo, $REPO_REPOSITORY, the config file, or the default under the user's data directory.\n\
Password: --password-file, $REPO_PASSWORD_FILE, $REPO_PASSWORD, $REPO_PASSWORD_COMMAND, the config file, or a prompt on a terminal.\n\
Exit codes: 0 ok, 1 error, 2 bad arguments, 3 finished but some files were not backed up or restored,\n\
4 a verification ran and failed, 10 no repository there, 11 repository locked by another process, 12 wrong password, 13 repository format too new, 14 damaged repository data,\n15 the repository's key, encryption or id changed since this host last opened it (see `repo trust`)."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug)]
pub struct Global {
    /// Repository: a directory or s3://bucket/prefix?endpoint=URL [env: REPO_REPOSITORY]
    #[arg(long, short = 'r', global = true, value_name = "PATH|URL")]
    pub repo: Option<PathBuf>,
    /// File holding the password (first line) [env: REPO_PASSWORD_FILE]
    #[arg(long, global = true, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Print machine-readable JSON instead of text
    #[arg(long, global = true)]
    pub json: bool,
    /// Print no progress and fewer messages
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// More log output (-v info, -vv debug)
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// How long to wait for a conflicting lock (a prune's sweep, a repair) before giving
    /// up: 0, 90s, 10m, 2h
    #[arg(long, global = true, value_name = "DURATION", default_value = "30m", value_parser = parse_wait)]
    pub lock_wait: std::time::Duration,
    /// Progress: a bar on a terminal, nothing, or one JSON object per event on stderr
    #[arg(long, global = true, value_enum, default_value_t = crate::progress::ProgressMode::Auto)]
    pub progress: crate::progress::ProgressMode,
    /// Log lines as text, or as JSON objects (with job, run and repository fields)
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Narrows which snapshot `latest` means, and which snapshots a listing shows.
#[derive(Args, Debug, Clone, Default)]
pub struct Filter {
    /// Only snapshots of this host (repeatable)
    #[arg(long = "host", value_name = "HOST")]
    pub hosts: Vec<String>,
    /// Only snapshots with this tag (repeatable: all must match)
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Only snapshots that include this path (repeatable)
    #[arg(long = "path", value_name = "PATH")]
    pub paths: Vec<String>,
    /// Only stream snapshots of this name
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a repository
    Init {
        /// Encryption of the repository's data
        #[arg(long, value_enum, default_value_t = EncryptionArg::Aes256Gcm)]
        encryption: EncryptionArg,
        /// Size after which a pack file is closed (1M to 1G; default 16M)
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        pack_size: Option<u64>,
        /// zstd level for new data: 0 (none) to 19; 3 by default, 1 is faster and a little larger
        #[arg(long, value_name = "LEVEL", value_parser = clap::value_parser!(i32).range(0..=19))]
        compression: Option<i32>,
        /// Content-defined chunk sizes of files and streams: minimum, average, maximum
        /// (default 256K,512K,4M; smaller chunks deduplicate more, larger ones cost less
        /// metadata)
        #[arg(long, value_name = "MIN,AVG,MAX", value_parser = parse_chunk_sizes)]
        chunk_sizes: Option<[u64; 3]>,
        /// Fixed chunk size of disk images: a power of two from 64K to 16M (default 256K;
        /// images over 256G get larger chunks)
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        image_chunk_size: Option<u64>,
        /// Repository format version: 2 (the default) or 1, which programs older than format 2
        /// can open but which keeps each file's chunk list in its directory's listing (a file
        /// of about 600 GiB at most)
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=2))]
        format_version: Option<u32>,
        /// Cut data as this other repository does (its chunker parameters and image chunk
        /// size, read from its config without a password), so that snapshots copied
        /// between the two (`repo copy`) and their own backups share data
        #[arg(long, value_name = "PATH|URL", conflicts_with_all = ["chunk_sizes", "image_chunk_size"])]
        copy_chunker_params_from: Option<String>,
    },
    /// Back up paths, a stream from standard input, a disk image or a database
    Backup(BackupArgs),
    /// List snapshots
    Snapshots {
        #[command(flatten)]
        filter: Filter,
    },
    /// List the files of a snapshot (below PATH)
    Ls {
        /// Snapshot id prefix or `latest`
        snapshot: String,
        /// Path inside the snapshot
        path: Option<PathBuf>,
        /// Long listing: mode, owner, size, time
        #[arg(long, short)]
        long: bool,
        #[command(flatten)]
        filter: Filter,
    },
    /// Write a file of a snapshot (or a stream snapshot) to standard output
    Cat {
        snapshot: String,
        /// Path inside the snapshot; not needed for a stream snapshot
        path: Option<PathBuf>,
        #[command(flatten)]
        filter: Filter,
    },
    /// Show what changed between two snapshots
    Diff {
        first: String,
        second: String,
        #[command(flatten)]
        filter: Filter,
    },
    /// Restore a snapshot into a directory
    Restore {
        snapshot: String,
        /// Directory to restore into; backed-up paths are recreated below it
        #[arg(long, short, required_unless_present = "vm")]
        target: Option<PathBuf>,
        /// A VM snapshot restored as a domain: its disks (qcow2) in --to, defined as
        /// --name (default: the original's name, which must be free), not started
        #[arg(long, conflicts_with_all = ["target", "include", "format"])]
        vm: bool,

        /// With --vm: the directory for the disks (default /var/lib/libvirt/images)
        #[arg(long, value_name = "DIR", requires = "vm")]
        to: Option<PathBuf>,
        /// With --vm: none (default), isolated, or a libvirt network for its cards
        #[arg(long, default_value = "none", requires = "vm")]
        network: String,
        /// With --vm: the libvirt URI
        #[arg(long, value_name = "URI", requires = "vm")]
        connect: Option<String>,
        /// Restore only this path of the snapshot, with everything below it (repeatable)
        #[arg(long, short)]
        include: Vec<PathBuf>,
        /// For an image snapshot restored to a file: raw (sparse) or qcow2
        #[arg(long, value_parser = ["raw", "qcow2"])]
        format: Option<String>,
        /// Return without waiting for the restored data to reach the disk
        #[arg(long)]
        no_sync: bool,
        /// Only snapshots of this host, for `latest` (repeatable)
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
        /// Only snapshots with this tag, for `latest` (repeatable: all must match)
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Only snapshots that include this path, for `latest` (repeatable)
        #[arg(long = "path", value_name = "PATH")]
        paths: Vec<String>,
        /// Only snapshots of this source (a stream's, image's or VM's name), for `latest`
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
        /// The same as --source; with --vm, the new domain's name instead
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// Show repository (or snapshot) statistics
    Stats {
        /// A snapshot to describe instead of the whole repository
        snapshot: Option<String>,
        #[command(flatten)]
        filter: Filter,
    },
    /// Verify the repository: structure always, the data with --read-data
    Check {
        /// Read every pack and verify every blob (decrypt, decompress, hash)
        #[arg(long)]
        read_data: bool,
        /// Read only subset N of M of the packs, e.g. 1/10 (implies --read-data)
        #[arg(long, value_name = "N/M", value_parser = parse_subset)]
        read_data_subset: Option<(u32, u32)>,
    },
    /// Serve every snapshot as a read-only filesystem at MOUNTPOINT
    Mount {
        mountpoint: PathBuf,
        /// Detach and run in the background once mounted
        #[arg(long)]
        daemon: bool,
        /// Let other users read through the mount, with every file's real owner and mode
        /// enforced (the default when run as root; other users need user_allow_other in
        /// /etc/fuse.conf)
        #[arg(long)]
        allow_other: bool,
        /// Only the user who mounts may use the mount (the default for non-root users)
        #[arg(long, conflicts_with = "allow_other")]
        private: bool,
        /// Memory for decoded blobs, e.g. 512M or 2G
        #[arg(long, default_value = "128M", value_parser = parse_size)]
        cache_size: u64,
        /// Threads serving requests (default: the cores, at least 2); more help readers
        /// that keep many reads in flight (a VM booting from the mount)
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
        threads: Option<u16>,
        /// Files of at least SIZE are read with direct I/O, bypassing the kernel's page
        /// cache: faster long reads of VM disks and dumps (Linux 6.6 or later; default 2G;
        /// `never` keeps every file in the page cache)
        #[arg(long, value_name = "SIZE", value_parser = parse_size_or_never)]
        direct_io_from: Option<SizeOrNever>,
        /// Show every file as owned by this user (a name or UID[:GID]) instead of its
        /// recorded owner, modes kept: for a service running as its own user that reads
        /// disk images a root backup recorded (a VM recovery's QEMU)
        #[arg(long, value_name = "USER")]
        owner: Option<String>,
        /// Serve one snapshot's directory (--snapshot, --dir) writable instead: every
        /// change lands in DIR, copied on write in chunks, never in the repository; an
        /// existing layer of the same snapshot and directory is reopened
        #[arg(long, value_name = "DIR", requires = "snapshot")]
        writable_layer: Option<PathBuf>,
        /// The snapshot a writable layer is over (an id prefix or `latest`)
        #[arg(long, value_name = "SNAPSHOT", requires = "writable_layer")]
        snapshot: Option<String>,
        /// The directory of the snapshot a writable layer serves (default: its root)
        #[arg(long = "dir", value_name = "PATH", requires = "writable_layer")]
        layer_path: Option<PathBuf>,
        /// Copy-on-write chunk of a new writable layer, e.g. 64K
        #[arg(long, value_name = "SIZE", default_value = "64K", value_parser = parse_size, requires = "writable_layer")]
        chunk_size: u64,
    },
    /// Unmount a `repo mount` (lazily: open files do not keep it mounted)
    Umount { mountpoint: PathBuf },
    /// Remove snapshots a keep policy does not keep (their data stays until a prune)
    Forget(ForgetArgs),
    /// Copy snapshots to another repository (another key and backend allowed); only the
    /// data it lacks is stored, and a snapshot copied before is skipped
    Copy(CopyArgs),
    /// Delete data no snapshot needs; rewrite packs that are mostly unused
    Prune(PruneArgs),
    /// Rebuild the index, salvage damaged packs, and mark snapshots that lost data
    Repair {
        /// Only the structure: do not read and verify every pack
        #[arg(long)]
        no_read_data: bool,
    },
    /// List the repository's locks, stale ones marked
    Locks,
    /// Remove stale locks (their process is gone, or they were not refreshed for 30 min)
    Unlock {
        /// Remove every lock, also those of processes that may still run (dangerous)
        #[arg(long)]
        all: bool,
    },
    /// Instant recovery: start a database on a snapshot, without restoring it
    #[command(subcommand)]
    Recover(RecoverCommand),
    /// Proof that a backup restores: boot a VM snapshot in an isolated lab and check its
    /// services, start a database snapshot and check it, restore a sample of files; the
    /// results are kept on this host (`repo verify list|show|stats`)
    #[command(subcommand)]
    Verify(VerifyCommand),
    /// Manage the passwords that open the repository
    #[command(subcommand)]
    Key(KeyCommand),
    /// Maintain the blob index
    #[command(subcommand)]
    Index(IndexCommand),
    /// Move the repository to the newest format (programs of the older format can no
    /// longer open it afterwards)
    Upgrade,
    /// Virtual machines through libvirt: list, start, stop, reboot, their libvirt
    /// snapshots, cleanup of backup jobs left by killed runs
    #[command(subcommand)]
    Vm(VmCommand),
    /// Jobs: backup templates (sources, repository, tags, retention, verification)
    /// that schedules, `repo job run` and the API run; every run is recorded
    Job(JobArgs),
    /// When jobs run: `daily 02:00`, `weekly sunday:03:00`, `monthly 15 04:00`, a cron
    /// expression, `mon..fri 22:30`; with a time zone, a random delay and a missed-run
    /// policy
    Schedule(ScheduleArgs),
    /// The control plane: runs the schedules, serves the REST API (/api/v1) and
    /// Prometheus metrics (/metrics) on 127.0.0.1:8087
    Serve(ServeArgs),
    /// An MCP server on stdin and stdout: tools an assistant lists and recovers
    /// backups, runs and verifies them, and operates VMs with; read-only unless
    /// --allow-changes; every change in the audit log as `via MCP` (docs/MCP.md)
    Mcp(McpArgs),
    /// Show the repository's identity (id, encryption, master key fingerprint) and
    /// whether this host knows it; every command refuses a repository whose identity
    /// changed (exit code 15) until it is accepted here
    Trust {
        /// Record the repository as it is now, replacing what this host knew of it (after
        /// re-creating it, or restoring it from elsewhere, on purpose)
        #[arg(long)]
        accept: bool,
        /// List every repository this host knows
        #[arg(long, conflicts_with = "accept")]
        list: bool,
    },
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Files and directories to back up
    #[arg(required_unless_present_any = ["stdin", "image", "nbd", "postgres", "mariadb", "vm"], conflicts_with_all = ["stdin", "image", "nbd", "postgres", "mariadb", "vm"])]
    pub paths: Vec<PathBuf>,
    /// Back up a libvirt domain by name (repeatable), or `all`: its disks, XML and
    /// firmware variables in one snapshot per domain, running (pull-mode backup, guest
    /// filesystems frozen when its agent answers) or stopped, incremental through
    /// checkpoints that survive power-off
    #[arg(long, value_name = "NAME", conflicts_with_all = ["stdin", "image", "nbd", "postgres", "mariadb", "name"])]
    pub vm: Vec<String>,
    /// With --vm: the libvirt URI (default qemu:///system)
    #[arg(long, value_name = "URI", requires = "vm")]
    pub connect: Option<String>,
    /// With --vm: fail unless the guest agent freezes the filesystems (no
    /// crash-consistent backup)
    #[arg(long, requires = "vm")]
    pub quiesce: bool,
    /// With --vm: read every disk whole, whatever changed-block tracking says
    #[arg(long, requires = "vm")]
    pub full: bool,
    /// Back up a PostgreSQL server: its data directory (pg_basebackup, WAL included), or
    /// with --logical one pg_dump per database. CONN: a libpq connection string or URI;
    /// without it the PG* environment, else the local cluster (peer authentication)
    #[arg(long, value_name = "CONN", num_args = 0..=1, default_missing_value = "", conflicts_with_all = ["stdin", "image", "nbd", "mariadb"])]
    pub postgres: Option<String>,
    /// Back up a MariaDB server: a prepared mariadb-backup copy, or with --logical one
    /// mariadb-dump per database. CONN: mariadb://USER[:PASSWORD]@HOST[:PORT] or a socket
    /// path; without it the client's defaults, /etc/mysql/debian.cnf, or root over the socket
    #[arg(long, value_name = "CONN", num_args = 0..=1, default_missing_value = "", conflicts_with_all = ["stdin", "image", "nbd"])]
    pub mariadb: Option<String>,
    /// With --postgres or --mariadb: dumps (one stream snapshot per database) instead of
    /// a physical copy
    #[arg(long)]
    pub logical: bool,
    /// Back up a disk image file (qcow2, raw, VMDK), read through a private qemu-nbd
    #[arg(long, value_name = "FILE", conflicts_with_all = ["stdin", "nbd"])]
    pub image: Option<PathBuf>,
    /// Back up an NBD export: nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT
    /// (libvirt pull-mode backup, qemu-nbd)
    #[arg(long, value_name = "URI", conflicts_with = "stdin", requires = "name")]
    pub nbd: Option<String>,
    /// With --nbd: read only the blocks this dirty bitmap marks; take the rest from the
    /// parent snapshot (changed-block tracking)
    #[arg(long, value_name = "BITMAP", requires = "nbd")]
    pub bitmap: Option<String>,
    /// Back up standard input as one stream
    #[arg(long, requires = "name")]
    pub stdin: bool,
    /// Name of the stream (with --stdin), image (default: the image file's name) or
    /// database source (default: postgresql, mariadb)
    #[arg(long)]
    pub name: Option<String>,
    /// Skip paths matching this glob (repeatable); without a `/` it matches names anywhere
    #[arg(long, short = 'e', value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Host name to record (default: this host's)
    #[arg(long)]
    pub host: Option<String>,
    /// Tag to record (repeatable)
    #[arg(long)]
    pub tag: Vec<String>,
    /// Compare against this snapshot instead of the latest of the same host and paths
    #[arg(long)]
    pub parent: Option<String>,
    /// Read every file, even those unchanged since the parent snapshot
    #[arg(long)]
    pub force: bool,
    /// Files read at once (default: four per core); more helps on slow or network
    /// filesystems, where each read waits longer
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub read_threads: Option<u16>,
    /// Also save this backup as job NAME (its sources, tags and host), to schedule or
    /// run later; this backup is the job's first run
    #[arg(long, value_name = "NAME", conflicts_with = "stdin")]
    pub save_as: Option<String>,
    /// With --save-as: the serve configuration whose notification targets jobs name
    #[arg(long, value_name = "FILE", requires = "save_as")]
    pub config: Option<PathBuf>,
}

/// The serve configuration (`/etc/cairn/serve.toml` unless given; none is needed).
#[derive(Args, Debug, Clone)]
pub struct SiteArgs {
    /// The serve configuration: repositories, limits, notification targets, jobs and
    /// schedules [default: /etc/cairn/serve.toml if it exists]
    #[arg(long, global = true, value_name = "FILE", env = "CAIRN_SERVE_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct McpArgs {
    #[command(flatten)]
    pub site: SiteArgs,
    /// Offer the change tools too (runs, recoveries, verifications, restores, VM power,
    /// forget); destructive ones still dry-run unless called with dry_run: false
    #[arg(long)]
    pub allow_changes: bool,
}

#[derive(Args, Debug)]
pub struct JobArgs {
    #[command(flatten)]
    pub site: SiteArgs,
    #[command(subcommand)]
    pub command: JobCommand,
}

#[derive(Subcommand, Debug)]
pub enum JobCommand {
    /// Add a job from a TOML file (`-` for standard input): name, repository, [[source]]
    /// tables, tags, host, [retention], [verify], notify
    Add {
        #[arg(long, short, value_name = "FILE")]
        file: PathBuf,
        /// Replace the job of the same name
        #[arg(long)]
        replace: bool,
    },
    /// Every job with its last run
    List,
    /// A job's definition (TOML) and its last runs
    Show { name: String },
    /// Remove a job and its schedules (its snapshots stay)
    Remove { name: String },
    /// Run a job now, here, and record the run
    Run {
        name: String,
        /// Say what the run would back up and forget; do nothing
        #[arg(long, short = 'n')]
        dry_run: bool,
    },
    /// Recorded runs, newest first
    Runs {
        /// Only this job's
        job: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// A run's log
    Log { run: i64 },
}

#[derive(Args, Debug)]
pub struct ScheduleArgs {
    #[command(flatten)]
    pub site: SiteArgs,
    #[command(subcommand)]
    pub command: ScheduleCommand,
}

#[derive(Subcommand, Debug)]
pub enum ScheduleCommand {
    /// Run JOB on a schedule: `daily 02:00`, `weekly sunday:03:00`, `monthly 15 04:00`,
    /// `hourly`, `every 6h`, cron (`30 2 * * 1-5`), `mon..fri 22:30`
    Add {
        job: String,
        when: String,
        /// An IANA time zone: Europe/Paris (default UTC)
        #[arg(long, value_name = "TZ")]
        timezone: Option<String>,
        /// Start each run after a random delay up to this long: 10m
        #[arg(long, value_name = "DURATION")]
        jitter: Option<String>,
        /// Runs missed while the daemon was down: run-once (at start, once) or skip
        #[arg(long, value_name = "POLICY")]
        missed: Option<String>,
        /// Verify the newest snapshot of each of JOB's sources at these times, instead
        /// of running it (the job's [verify.snapshots] says how)
        #[arg(long)]
        verify: bool,
    },
    /// Every schedule with its next run
    List,
    Remove {
        id: i64,
    },
    Enable {
        id: i64,
    },
    Disable {
        id: i64,
    },
    /// What would run now, and which runs were missed
    Due,
    /// The coming run times
    Next {
        /// Only this schedule's
        id: Option<i64>,
        #[arg(long, default_value_t = 5)]
        count: usize,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub site: SiteArgs,
    /// Address to listen on [default: the configuration's, else 127.0.0.1:8087]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    pub command: Option<ServeCommand>,
}

#[derive(Subcommand, Debug)]
pub enum ServeCommand {
    /// API tokens
    #[command(subcommand)]
    Token(TokenCommand),
    /// Dashboard users (they log in with a password)
    #[command(subcommand)]
    User(UserCommand),
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Add a user; the password is asked twice on a terminal, or read from stdin
    Add {
        name: String,
        /// The user can read, never change anything
        #[arg(long)]
        read_only: bool,
        /// Read the password from the first line of stdin
        #[arg(long)]
        password_stdin: bool,
    },
    List,
    /// Remove a user and end their sessions
    Remove {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token; it is shown once and stored hashed
    Create {
        #[arg(long)]
        name: String,
        /// The token can read, never change anything
        #[arg(long)]
        read_only: bool,
        /// A storage token for this repository instead (other hosts back up to
        /// https://THIS-HOST:PORT/repo/NAME with it); it opens nothing of the API
        #[arg(long, value_name = "NAME")]
        repository: Option<String>,
        /// With --repository: add backups, never delete or rewrite them (a backed-up
        /// host's token: its compromise cannot destroy its backups)
        #[arg(long, requires = "repository")]
        append_only: bool,
        /// With --repository: the bytes of new files the token may add in all
        #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "repository")]
        quota: Option<u64>,
    },
    List,
    Revoke {
        name: String,
    },
}

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// Snapshots to copy (ids or `latest`); none: every snapshot the filters select
    pub snapshots: Vec<String>,
    /// The repository to copy into: a directory or s3://bucket/prefix?endpoint=URL
    #[arg(long, value_name = "PATH|URL")]
    pub to: String,
    /// The repository to copy from (default: --repo)
    #[arg(long, value_name = "PATH|URL")]
    pub from: Option<String>,
    /// File holding the destination's password [env: REPO_TO_PASSWORD_FILE]; else
    /// REPO_TO_PASSWORD; else the source's password
    #[arg(long, value_name = "FILE")]
    pub to_password_file: Option<PathBuf>,
    /// Only the newest N snapshots of each host and source
    #[arg(long, value_name = "N")]
    pub latest: Option<usize>,
    #[command(flatten)]
    pub filter: Filter,
}

#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// Snapshots to forget (id prefixes or `latest`), instead of keep rules
    #[arg(value_name = "SNAPSHOT")]
    pub snapshots: Vec<String>,
    /// Keep the N newest snapshots
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_last: u32,
    /// Keep the newest snapshot of each of the N newest hours that have one
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_hourly: u32,
    /// ... days (UTC)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_daily: u32,
    /// ... ISO weeks
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_weekly: u32,
    /// ... months
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_monthly: u32,
    /// ... years
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_yearly: u32,
    /// Keep every snapshot within this duration of the group's newest: 7d, 12h, 2w, 1y6m
    #[arg(long, value_name = "DURATION", value_parser = cairn_engine::retention::parse_duration)]
    pub keep_within: Option<chrono::Duration>,
    /// Keep every snapshot with this tag (repeatable)
    #[arg(long, value_name = "TAG")]
    pub keep_tag: Vec<String>,
    /// What makes a group the policy applies to separately
    #[arg(long, value_name = "host,source", default_value = "host,source")]
    pub group_by: String,
    /// List every snapshot with keep/remove and the rule that kept it; remove nothing
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Prune afterwards (see `repo prune`)
    #[arg(long)]
    pub prune: bool,
    #[command(flatten)]
    pub prune_args: PruneOptionsArgs,
    #[command(flatten)]
    pub filter: Filter,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Report what would be deleted and rewritten; change nothing
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    #[command(flatten)]
    pub options: PruneOptionsArgs,
}

#[derive(Args, Debug, Clone)]
pub struct PruneOptionsArgs {
    /// Rewrite a pack when more than this share of it is unused: 10%, 0%, 50%
    #[arg(long, value_name = "PERCENT", default_value = "10%", value_parser = parse_percent)]
    pub max_unused: f64,
    /// Also leave data written within this long alone: 1h, 30m, 0 (the default: what
    /// running and interrupted backups may still need is kept by their locks)
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = parse_wait)]
    pub grace: std::time::Duration,
}

#[derive(Subcommand, Debug)]
pub enum RecoverCommand {
    /// Start the database of a physical database snapshot on an overlay of the mount, and
    /// print how to connect (writes land in the overlay, never in the repository)
    Db {
        /// Snapshot id prefix or `latest`
        snapshot: String,
        /// Host port to publish the database on (default: a free one), on 127.0.0.1
        #[arg(long)]
        port: Option<u16>,
        /// Container image (default: postgres:<major> or mariadb:<major> of the recorded
        /// server version)
        #[arg(long)]
        image: Option<String>,
        /// Let clients write (into the overlay); read-only by default
        #[arg(long)]
        writable: bool,
        /// Where the server runs: a Docker container, or a process of the host's own
        /// binaries (hosts without Docker)
        #[arg(long, value_enum, default_value_t = RuntimeArg::Docker)]
        runtime: RuntimeArg,
        /// Seconds to wait for the server to answer (crash recovery replays WAL first)
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Where writes land: block (the mount's writable layer, copied on write in
        /// 64 KiB chunks) or overlay (overlayfs over the read-only mount: a whole file is
        /// copied up on its first write; for comparison, or where the layer cannot run)
        #[arg(long, value_enum, default_value_t = LayerArg::Block)]
        layer: LayerArg,
        /// The block layer's copy-on-write chunk, e.g. 16K (default 64K: a PostgreSQL
        /// page written into a chunk not yet local copies the rest of it)
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        chunk_size: Option<u64>,
        #[command(flatten)]
        filter: Filter,
    },
    /// Boot a VM snapshot as a new domain on qcow2 overlays of the mount (writes land in
    /// the overlays, never in the repository): no network by default, new name, UUID and
    /// MAC addresses
    Vm {
        /// Snapshot id prefix or `latest` (with --name-of, the VM's latest)
        snapshot: String,
        /// The copy's name (default: <original>-recovered-<session>)
        #[arg(long)]
        name: Option<String>,
        /// For `latest`: the latest snapshot of this VM
        #[arg(long, value_name = "VM")]
        source: Option<String>,
        /// For `latest`: only snapshots of this host
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
        /// none (default), isolated (a libvirt network with no forwarding and no
        /// address: guests on it reach each other only), or a libvirt network's name
        #[arg(long, default_value = "none")]
        network: String,
        /// Define the domain, do not start it
        #[arg(long)]
        no_start: bool,
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
    },
    /// Copy a running recovered VM's disks to real storage (block copy, then pivot) while
    /// it runs, so that the session can end and the VM keeps running on its own disks
    Promote {
        /// Session id
        id: String,
        /// Directory for the disks (one qcow2 each)
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// How long the copy may take
        #[arg(long, value_name = "DURATION", default_value = "2h", value_parser = parse_wait)]
        timeout: std::time::Duration,
    },
    /// List the recovery sessions of this host
    List,
    /// Stop recovery sessions: server, overlay, mount and scratch files
    Stop {
        /// Session id
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Stop every session
        #[arg(long)]
        all: bool,
    },
    /// Remove what crashed or killed sessions left behind (after a reboot, a kill -9)
    Cleanup,
    /// Back up a writable database session as it is now: a new snapshot of the same
    /// source (its parent: the session's snapshot), the server frozen meanwhile
    Commit {
        id: String,
        /// Tag the new snapshot (repeatable; the original's tags are kept)
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum VerifyCommand {
    /// Boot a VM snapshot as a new domain in a lab of its own (a network namespace the
    /// guest cannot leave), wait for its boot, ping it, check its services, run a script;
    /// every step timed, everything removed afterwards (also on failure and timeout)
    Vm {
        /// Snapshot id prefix or `latest` (with --source, that VM's latest)
        snapshot: String,
        /// boot, boot_ping, boot_ping_services or full (services and a script)
        #[arg(long, default_value = "boot_ping")]
        test: String,
        /// Services to check: ssh, http, https, smtp, rdp, postgresql, mysql, tcp:PORT,
        /// http:PORT/PATH, https:PORT/PATH (comma-separated)
        #[arg(long, value_name = "LIST", default_value = "")]
        services: String,
        /// For `full`: a shell script run inside the guest through its agent
        /// (guest-exec); exit status 0 passes
        #[arg(long, value_name = "FILE")]
        script: Option<PathBuf>,
        /// For `full`: a program run on the host inside the lab, the guest's address in
        /// $CAIRN_VERIFY_ADDRESS; exit status 0 passes
        #[arg(long, value_name = "FILE")]
        host_script: Option<PathBuf>,
        /// How long the guest may take to boot
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_wait)]
        timeout: std::time::Duration,
        /// How long the ping and each service may take to answer after the boot
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_wait)]
        service_wait: std::time::Duration,
        /// lab (default: a network namespace of its own, the checks run inside it), or
        /// the name of a libvirt network without forwarding kept for tests
        #[arg(long, default_value = "lab")]
        network: String,
        /// For `latest`: the latest snapshot of this VM
        #[arg(long, value_name = "VM")]
        source: Option<String>,
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
    },
    /// Start a database snapshot as a recovery session and check it: connections, every
    /// database, amcheck on the indexes (PostgreSQL) or CHECK TABLE (MariaDB), row
    /// counts, and the queries given
    Db {
        /// Snapshot id prefix or `latest`
        snapshot: String,
        /// A query to run (repeatable); with --expect-rows, how many rows each must give
        #[arg(long = "query", value_name = "SQL")]
        queries: Vec<String>,
        /// The number of rows each --query must return
        #[arg(long, value_name = "N", requires = "queries")]
        expect_rows: Option<u64>,
        /// The database the queries run in (default: the server's default one)
        #[arg(long)]
        database: Option<String>,
        #[arg(long, value_enum, default_value_t = RuntimeArg::Docker)]
        runtime: RuntimeArg,
        /// Container image (default: the recorded server version's)
        #[arg(long)]
        image: Option<String>,
        /// How long the server may take to accept connections
        #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_wait)]
        timeout: std::time::Duration,
        #[command(flatten)]
        filter: Filter,
    },
    /// Restore a sample of a snapshot's files into a scratch directory and compare them
    /// with the sizes and hashes the snapshot recorded (end to end, cheaper than
    /// `check --read-data`)
    Files {
        /// Snapshot id prefix or `latest`
        snapshot: String,
        /// The share of the files to restore: 10%, 100%
        #[arg(long, value_name = "PERCENT", default_value = "10%", value_parser = parse_percent)]
        sample: f64,
        /// Where the sample is restored (removed afterwards; default: the system's
        /// temporary directory)
        #[arg(long, value_name = "DIR")]
        scratch: Option<PathBuf>,
        #[command(flatten)]
        filter: Filter,
    },
    /// The verifications of this host, newest first
    List {
        /// Only vm, db or files
        #[arg(long)]
        kind: Option<String>,
        /// Only pending, running, passed, failed or warning
        #[arg(long)]
        status: Option<String>,
        /// Only this snapshot's (id prefix)
        #[arg(long)]
        snapshot: Option<String>,
        /// At most this many
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One verification: every step with its result, duration and detail, and the log
    Show { id: i64 },
    /// Totals, success rate, average duration by test, the last verification, and the
    /// repository's snapshots never verified or not verified for --stale-days
    Stats {
        /// A snapshot whose last verification is older than this many days is listed
        #[arg(long, value_name = "DAYS", default_value_t = 7)]
        stale_days: u64,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum LayerArg {
    Block,
    Overlay,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum RuntimeArg {
    Docker,
    Process,
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Every domain with its state, disks, last snapshot and whether changed-block
    /// tracking is ready for an incremental
    List {
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
    },
    Start {
        name: String,
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
    },
    /// Shut down (the guest agent, else ACPI), waiting up to --wait; --force pulls the plug
    Stop {
        name: String,
        #[arg(long)]
        force: bool,
        #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_wait)]
        wait: std::time::Duration,
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
    },
    Reboot {
        name: String,
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
    },
    /// libvirt's own snapshots of a domain
    Snapshots {
        name: String,
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
    },
    /// Delete one of libvirt's snapshots of a domain
    SnapshotDelete {
        name: String,
        snapshot: String,
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
    },
    /// A new domain from a VM snapshot: its disks restored to DIR, defined as NAME (new
    /// UUID and MAC addresses, no network unless --network), not started
    Clone {
        snapshot: String,
        #[arg(long)]
        name: String,
        /// Where the disks go (default: /var/lib/libvirt/images)
        #[arg(long, value_name = "DIR")]
        to: Option<PathBuf>,
        /// none (default), or the libvirt network to attach the copy's cards to
        #[arg(long, default_value = "none")]
        network: String,
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
    },
    /// End the backup jobs killed `repo backup --vm` runs left on domains
    Cleanup {
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// List the key files
    List,
    /// Add a password
    Add {
        /// File holding the new password (otherwise prompted)
        #[arg(long, value_name = "FILE")]
        new_password_file: Option<PathBuf>,
    },
    /// Remove a key (not the one in use)
    Remove {
        /// Key id (or a unique prefix)
        id: String,
    },
    /// Change the password in use
    Passwd {
        #[arg(long, value_name = "FILE")]
        new_password_file: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum IndexCommand {
    /// Recreate the index from the pack files
    Rebuild,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum EncryptionArg {
    #[value(name = "aes-256-gcm")]
    Aes256Gcm,
    None,
}

/// Parses `512M`, `2G`, `1048576` (binary units).
/// `MIN,AVG,MAX`, each a size (`256K`).
pub fn parse_chunk_sizes(s: &str) -> Result<[u64; 3], String> {
    let parts: Vec<u64> = s.split(',').map(parse_size).collect::<Result<_, _>>()?;
    <[u64; 3]>::try_from(parts).map_err(|_| format!("expected MIN,AVG,MAX, got {s:?}"))
}

/// A size, or `never` for a threshold that nothing reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeOrNever(pub Option<u64>);

pub fn parse_size_or_never(s: &str) -> Result<SizeOrNever, String> {
    if s.trim().eq_ignore_ascii_case("never") {
        Ok(SizeOrNever(None))
    } else {
        parse_size(s).map(|n| SizeOrNever(Some(n)))
    }
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown unit in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("not a size: {s:?}"))
}

/// Parses `N/M` with 1 <= N <= M.
pub fn parse_subset(s: &str) -> Result<(u32, u32), String> {
    cairn_engine::check::parse_subset(s)
}

/// Parses `90s`, `10m`, `2h`, `1d`, `0` (a bare number is seconds).
pub fn parse_wait(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: give a number and a unit, e.g. 90s, 10m, 2h, 1d"))?;
    let mult = match unit.trim() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86400,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use s, m, h or d)")),
    };
    n.checked_mul(mult)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("{s:?}: too long"))
}

/// Parses `10%`, `10` (percent) into a share 0..=1.
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('%')
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: give a percentage, e.g. 10%"))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(format!("{s:?}: must be between 0% and 100%"));
    }
    Ok(v / 100.0)
}

#[cfg(test)]
mod tests {
    /// Every command's arguments are consistent (unique names, valid relations): clap
    /// checks a command only when it is used, so a broken one would panic in front of a
    /// user.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
