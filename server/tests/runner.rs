//! The runner against real repositories on disk: runs recorded from queued to
//! finished with their figures and log, retention applied to the job's own snapshots,
//! one run per job, cancel (queued and running), a source that vanished.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_agent::source::Source;
use cairn_engine::crypto::Encryption;
use cairn_engine::keyfile::KdfParams;
use cairn_engine::trust::KnownRepositories;
use cairn_engine::Repository;
use cairn_server::config::RepositoryConfig;
use cairn_server::job::{JobDefinition, Retention};
use cairn_server::repos::Repositories;
use cairn_server::runner::{Observer, RunEvent, RunEventKind, Runner, RunnerOptions, SubmitError};
use cairn_server::schedule::SystemClock;
use cairn_server::state::{RunId, RunStatus, RunTrigger, State};

struct Fixture {
    dir: tempfile::TempDir,
    state: Arc<State>,
    runner: Runner,
    events: Arc<Recorder>,
}

#[derive(Default)]
struct Recorder(Mutex<Vec<RunEvent>>);

impl Observer for Recorder {
    fn on(&self, e: &RunEvent) {
        self.0.lock().unwrap().push(e.clone());
    }
}

fn fixture(concurrent_runs: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let repo_path = dir.path().join("repo");
    Repository::init(
        &repo_path,
        b"pw",
        Encryption::Aes256Gcm,
        KdfParams::TEST_ONLY_WEAK,
    )
    .unwrap();
    let mut configs = BTreeMap::new();
    configs.insert(
        "default".to_owned(),
        RepositoryConfig {
            path: repo_path,
            inline: Some(zeroize::Zeroizing::new(b"pw".to_vec())),
            ..RepositoryConfig::default()
        },
    );
    let repos = Arc::new(Repositories::new(
        configs,
        KnownRepositories::at(dir.path().join("known.json")),
        Arc::new(cairn_server::directory::Directories::at(
            &dir.path().join("state"),
        )),
    ));
    let state = Arc::new(State::open(&dir.path().join("state")).unwrap());
    let events = Arc::new(Recorder::default());
    let runner = Runner::start(
        state.clone(),
        repos,
        Arc::new(SystemClock),
        RunnerOptions {
            concurrent_runs,
            progress_interval: Duration::from_millis(50),
            ..RunnerOptions::default()
        },
        vec![events.clone()],
    );
    Fixture {
        dir,
        state,
        runner,
        events,
    }
}

fn paths_job(name: &str, paths: &[&Path]) -> JobDefinition {
    JobDefinition::from_toml(&format!(
        "name = {name:?}\n[[source]]\ntype = \"paths\"\npaths = [{}]\n",
        paths
            .iter()
            .map(|p| format!("{:?}", p.display().to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .unwrap()
}

fn command_job(name: &str, script: &str) -> JobDefinition {
    JobDefinition {
        sources: vec![Source::Command {
            name: "stream".into(),
            argv: vec!["sh".into(), "-c".into(), script.into()],
        }],
        ..paths_job(name, &[Path::new("/")])
    }
}

fn files(dir: &Path, n: usize) -> std::path::PathBuf {
    let d = dir.join("data");
    std::fs::create_dir_all(&d).unwrap();
    for i in 0..n {
        std::fs::write(
            d.join(format!("f{i}")),
            format!("file {i} ").repeat(100 * (i + 1)),
        )
        .unwrap();
    }
    d
}

/// Waits for run `id` to finish (a minute at most: a hang fails the test).
fn finished(f: &Fixture, id: RunId) -> cairn_server::state::Run {
    let start = Instant::now();
    loop {
        let r = f.state.run(id).unwrap().unwrap();
        if r.status.is_finished() {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "run {id} never finished: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_run_is_recorded_with_its_figures_and_log_and_keeps_only_what_the_policy_keeps() {
    let f = fixture(2);
    let data = files(f.dir.path(), 5);
    let mut job = paths_job("etc", &[&data]);
    job.retention = Some(Retention {
        keep_last: 1,
        prune: true,
        ..Retention::default()
    });
    let first = f.runner.submit(&job, RunTrigger::Api).unwrap();
    let r1 = finished(&f, first);
    assert_eq!(r1.status, RunStatus::Succeeded, "{r1:?}");
    assert_eq!(r1.stats.files, 5);
    assert_eq!(r1.stats.snapshots.len(), 1);
    assert!(r1.stats.bytes_stored > 0);
    assert!(r1.started_at.is_some() && r1.ended_at.is_some());

    std::fs::write(data.join("new"), b"new file").unwrap();
    let second = f.runner.submit(&job, RunTrigger::Api).unwrap();
    let r2 = finished(&f, second);
    assert_eq!(r2.status, RunStatus::Succeeded, "{r2:?}");
    assert_eq!(r2.stats.files, 6);
    assert_eq!(r2.stats.forgotten, 1, "keep_last 1 forgets the first");

    // Another job's snapshot in the same repository is not this job's to forget.
    let other = paths_job("other", &[&data]);
    let third = f.runner.submit(&other, RunTrigger::Api).unwrap();
    assert_eq!(finished(&f, third).status, RunStatus::Succeeded);
    let again = f.runner.submit(&job, RunTrigger::Api).unwrap();
    assert_eq!(finished(&f, again).stats.forgotten, 1);

    let repo = Repository::open(&f.dir.path().join("repo"), &|| {
        Ok(zeroize::Zeroizing::new(b"pw".to_vec()))
    })
    .unwrap();
    let snaps = repo.snapshots().unwrap();
    let tagged = |t: &str| {
        snaps
            .iter()
            .filter(|s| s.manifest.tags.iter().any(|x| x == t))
            .count()
    };
    assert_eq!(tagged("job:etc"), 1);
    assert_eq!(tagged("job:other"), 1);

    let log = f.state.log(second, 0).unwrap();
    let text: Vec<_> = log.iter().map(|l| l.message.as_str()).collect();
    assert!(
        text.iter().any(|l| l.starts_with("backing up paths")),
        "{text:?}"
    );
    assert!(
        text.iter().any(|l| l.contains("retention: forgot 1")),
        "{text:?}"
    );

    f.runner.wait_idle();
    let events = f.events.0.lock().unwrap();
    let of_second: Vec<_> = events.iter().filter(|e| e.run == second).collect();
    assert!(matches!(of_second[0].kind, RunEventKind::Queued { .. }));
    assert!(matches!(of_second[1].kind, RunEventKind::Started));
    assert!(of_second
        .iter()
        .any(|e| matches!(e.kind, RunEventKind::Progress(_))));
    assert!(matches!(
        of_second.last().unwrap().kind,
        RunEventKind::Finished {
            status: RunStatus::Succeeded,
            ..
        }
    ));
}

#[test]
fn a_job_never_runs_twice_at_once_and_a_queued_run_can_be_cancelled() {
    let f = fixture(1);
    let slow = command_job("slow", "sleep 2; echo done");
    let a = f.runner.submit(&slow, RunTrigger::Api).unwrap();
    match f.runner.submit(&slow, RunTrigger::Schedule) {
        Err(SubmitError::Busy { run, .. }) => assert_eq!(run, a),
        other => panic!("a second run of a busy job was accepted: {other:?}"),
    }
    // With one worker, another job waits in the queue; cancelling it drops it.
    let other = command_job("other", "echo x");
    let b = f.runner.submit(&other, RunTrigger::Api).unwrap();
    assert!(f.runner.cancel(b));
    let rb = finished(&f, b);
    assert_eq!(rb.status, RunStatus::Cancelled);
    assert!(rb.started_at.is_none());
    assert_eq!(finished(&f, a).status, RunStatus::Succeeded);
    f.runner.wait_idle();
    assert!(!f.runner.cancel(a), "a finished run cannot be cancelled");
}

#[test]
fn a_running_job_stops_when_cancelled_and_commits_nothing() {
    let f = fixture(1);
    let endless = command_job(
        "endless",
        "while true; do head -c 1048576 /dev/urandom; sleep 0.05; done",
    );
    let id = f.runner.submit(&endless, RunTrigger::Api).unwrap();
    let start = Instant::now();
    while f.runner.live(id).is_none_or(|s| s.bytes_read < 2 << 20) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the stream never flowed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(f.runner.cancel(id));
    let r = finished(&f, id);
    assert_eq!(r.status, RunStatus::Cancelled, "{r:?}");
    assert!(r.stats.snapshots.is_empty());
    let repo = Repository::open(&f.dir.path().join("repo"), &|| {
        Ok(zeroize::Zeroizing::new(b"pw".to_vec()))
    })
    .unwrap();
    assert!(repo.snapshots().unwrap().is_empty());
}

#[test]
fn a_source_that_vanished_fails_the_run_and_the_other_sources_are_kept() {
    let f = fixture(1);
    let data = files(f.dir.path(), 2);
    let gone = f.dir.path().join("gone");
    let mut job = paths_job("mixed", &[&data]);
    job.sources.push(Source::Paths {
        paths: vec![gone.clone()],
        excludes: vec![],
    });
    job.retention = Some(Retention {
        keep_last: 1,
        ..Retention::default()
    });
    let id = f.runner.submit(&job, RunTrigger::Api).unwrap();
    let r = finished(&f, id);
    assert_eq!(r.status, RunStatus::Failed);
    let error = r.error.unwrap();
    assert!(
        error.contains("1 of 2 sources failed") && error.contains("gone"),
        "{error}"
    );
    assert_eq!(
        r.stats.snapshots.len(),
        1,
        "the first source's snapshot stays"
    );
    let log = f.state.log(id, 0).unwrap();
    assert!(log
        .iter()
        .any(|l| l.level == "error" && l.message.contains("gone")));
    assert!(log.iter().any(|l| l.message.contains("retention skipped")));
}

#[test]
fn a_job_on_an_unknown_repository_fails_with_a_clear_error() {
    let f = fixture(1);
    let mut job = command_job("elsewhere", "echo x");
    job.repository = "offsite".into();
    let r = finished(&f, f.runner.submit(&job, RunTrigger::Api).unwrap());
    assert_eq!(r.status, RunStatus::Failed);
    assert!(r.error.unwrap().contains("no repository \"offsite\""));
}
