//! A site with history, for benches/serve.sh: 100 jobs and 10,000 finished runs in a
//! state directory, and 10,000 snapshots in a repository (copies of its newest
//! snapshot's manifest, an hour apart, tagged with the jobs' tags).
//!
//! Usage: serve_fixture STATE_DIR REPOSITORY PASSWORD_FILE [JOBS] [RUNS] [SNAPSHOTS]

use std::collections::BTreeMap;
use std::path::PathBuf;

use cairn_server::config::RepositoryConfig;
use cairn_server::job::JobDefinition;
use cairn_server::repos::Repositories;
use cairn_server::state::{Origin, RunStats, RunStatus, RunTrigger, State};
use chrono::{Duration, Utc};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err(
            "usage: serve_fixture STATE_DIR REPOSITORY PASSWORD_FILE [JOBS] [RUNS] [SNAPSHOTS]"
                .into(),
        );
    }
    let number = |i: usize, default: usize| args.get(i).map_or(Ok(default), |a| a.parse());
    let (jobs, runs, snapshots) = (number(4, 100)?, number(5, 10_000)?, number(6, 10_000)?);
    let state_dir = PathBuf::from(&args[1]);
    let repo_path = PathBuf::from(&args[2]);

    let state = State::open(&state_dir)?;
    let now = Utc::now();
    for j in 0..jobs {
        let job: JobDefinition = serde_json::from_value(serde_json::json!({
            "name": format!("job-{j:03}"),
            "source": [{ "type": "paths", "paths": [format!("/srv/data-{j}")] }],
            "retention": { "keep_daily": 7 },
        }))?;
        state.put_job(&job, Origin::Api, now)?;
    }
    for r in 0..runs {
        let at = now - Duration::minutes(i64::try_from(runs - r)?);
        let job = format!("job-{:03}", r % jobs.max(1));
        let id = state.create_run(&job, RunTrigger::Schedule, at)?;
        state.start_run(id, 1, at)?;
        let failed = r % 50 == 0;
        let stats = RunStats {
            files: 1200,
            total_bytes: 3 << 30,
            bytes_read: 40 << 20,
            bytes_new: 12 << 20,
            bytes_stored: 5 << 20,
            duration_ms: 42_000,
            snapshots: vec![format!("{r:064x}")],
            ..RunStats::default()
        };
        let status = if failed {
            RunStatus::Failed
        } else {
            RunStatus::Succeeded
        };
        let error = failed.then_some("the source vanished");
        state.finish_run(id, status, error, &stats, at + Duration::seconds(42))?;
    }

    let mut configs = BTreeMap::new();
    configs.insert(
        "default".to_owned(),
        RepositoryConfig {
            path: repo_path,
            password_file: Some(PathBuf::from(&args[3])),
            password_command: None,
            password_env: None,
            inline: None,
        },
    );
    let known =
        cairn_engine::trust::KnownRepositories::at(state_dir.join("known-repositories.json"));
    let directories = std::sync::Arc::new(cairn_server::directory::Directories::at(&state_dir));
    let repo = Repositories::new(configs, known, directories).handle("default")?;
    let newest = repo
        .snapshots()?
        .into_iter()
        .max_by_key(|s| s.manifest.time)
        .ok_or("the repository has no snapshot to copy: back something up first")?;
    for s in 0..snapshots {
        let mut m = newest.manifest.clone();
        m.time = newest.manifest.time - Duration::hours(i64::try_from(s + 1)?);
        m.tags = vec![format!("job:job-{:03}", s % jobs.max(1))];
        repo.save_snapshot(&m)?;
    }
    println!("{jobs} jobs, {runs} runs, {snapshots} more snapshots");
    Ok(())
}
