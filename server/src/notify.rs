//! Notifications: who hears about what, and how it is said.
//!
//! A job names its targets (`notify = ["ops"]`); a target says what it hears about
//! (`on`: failure, success, missed, verification-failure) and may get a digest of the
//! site's runs (`digest = "daily 08:00"`, UTC). Targets are email (SMTP through lettre,
//! rustls; a text and an HTML part, in English or French) and webhooks (a JSON POST,
//! signed with HMAC-SHA256 in `X-Cairn-Signature: sha256=<hex>` when a secret is
//! configured).
//!
//! Sending happens on a thread of its own: a run's end, or a scheduler tick, only
//! queues a notice. A delivery that fails is tried three times (1 s, then 5 s apart),
//! then logged and counted (`cairn_notifications_total{result="failed"}`); a failed
//! delivery never fails a run.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};

use crate::config::{Target, TargetKind, Trigger};
use crate::metrics::{Metrics, TargetLabel};
use crate::runner::{Observer, RunEvent, RunEventKind};
use crate::state::{LogLine, Run, RunQuery, RunStatus, State};

/// Something to tell.
#[derive(Debug, Clone)]
pub enum Notice {
    Run {
        trigger: Trigger,
        run: Box<Run>,
        log_tail: Vec<LogLine>,
    },
    Missed {
        job: String,
        slot: DateTime<Utc>,
        reason: String,
    },
    Digest {
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        runs: Vec<Run>,
    },
    /// "Send a test" of the dashboard: proof that a target is reachable.
    Test { by: String, at: DateTime<Utc> },
    /// A verification of one of the job's snapshots failed.
    Verification {
        job: String,
        verification: Box<cairn_recover::verify::Verification>,
    },
}

impl Notice {
    fn trigger(&self) -> Option<Trigger> {
        match self {
            Self::Run { trigger, .. } => Some(*trigger),
            Self::Missed { .. } => Some(Trigger::Missed),
            Self::Verification { .. } => Some(Trigger::VerificationFailure),
            Self::Digest { .. } | Self::Test { .. } => None,
        }
    }
}

/// What one message says, in one language.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// Queues notices and delivers them.
pub struct Notifier {
    targets: BTreeMap<String, Target>,
    state: Arc<State>,
    tx: Mutex<Option<mpsc::Sender<(String, Notice)>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Notifier {
    /// Starts the delivery thread.
    #[must_use]
    pub fn start(
        targets: BTreeMap<String, Target>,
        state: Arc<State>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel::<(String, Notice)>();
        let h = cairn_engine::repository::current_host();
        let t = targets.clone();
        let thread = std::thread::Builder::new()
            .name("notify".into())
            .spawn(move || {
                for (name, notice) in rx {
                    let Some(target) = t.get(&name) else { continue };
                    let result = deliver_with_retries(target, &notice, &h);
                    let ok = result.is_ok();
                    if let Err(e) = result {
                        tracing::error!(target = %name, "notification not delivered: {e}");
                    }
                    metrics
                        .notifications
                        .get_or_create(&TargetLabel {
                            target: name.clone(),
                            result: if ok { "sent" } else { "failed" }.to_owned(),
                        })
                        .inc();
                }
            })
            .expect("spawning the notification thread");
        Arc::new(Self {
            targets,
            state,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    fn queue(&self, target: &str, notice: Notice) {
        if let Ok(tx) = self.tx.lock() {
            if let Some(tx) = tx.as_ref() {
                let _ = tx.send((target.to_owned(), notice));
            }
        }
    }

    /// Queues `notice` for each of `job`'s targets that hears about it.
    fn tell_job(&self, job: &str, notice: &Notice) {
        let Ok(Some(j)) = self.state.job(job) else {
            return;
        };
        let Some(trigger) = notice.trigger() else {
            return;
        };
        for name in &j.definition.notify {
            if self
                .targets
                .get(name)
                .is_some_and(|t| t.on.contains(&trigger))
            {
                self.queue(name, notice.clone());
            }
        }
    }

    /// A verification of `job`'s snapshot failed.
    pub fn verification_failed(&self, job: &str, v: &cairn_recover::verify::Verification) {
        self.tell_job(
            job,
            &Notice::Verification {
                job: job.to_owned(),
                verification: Box::new(v.clone()),
            },
        );
    }

    /// A scheduled run that did not happen.
    pub fn missed(&self, job: &str, slot: DateTime<Utc>, reason: &str) {
        self.tell_job(
            job,
            &Notice::Missed {
                job: job.to_owned(),
                slot,
                reason: reason.to_owned(),
            },
        );
    }

    /// Sends the digests whose time has come (called by the scheduler's tick).
    pub fn digests(&self, now: DateTime<Utc>) {
        for (name, target) in &self.targets {
            let Some(spec) = &target.digest else { continue };
            let Ok(schedule) = crate::schedule::Schedule::new(
                spec,
                None,
                Duration::ZERO,
                crate::schedule::MissedPolicy::Skip,
            ) else {
                continue;
            };
            let key = format!("digest:{name}");
            let last = self
                .state
                .meta(&key)
                .ok()
                .flatten()
                .and_then(|v| DateTime::parse_from_rfc3339(&v).ok())
                .map(|t| t.with_timezone(&Utc));
            let Some(last) = last else {
                // First start: count from now.
                let _ = self.state.set_meta(&key, &now.to_rfc3339());
                continue;
            };
            let Some(slot) = schedule.next_slot(last) else {
                continue;
            };
            if slot > now {
                continue;
            }
            let runs = self
                .state
                .runs(&RunQuery {
                    limit: 10_000,
                    ..RunQuery::default()
                })
                .unwrap_or_default()
                .into_iter()
                .filter(|r| r.ended_at.is_some_and(|e| e > last && e <= now))
                .collect();
            if self.state.set_meta(&key, &now.to_rfc3339()).is_ok() {
                self.queue(
                    name,
                    Notice::Digest {
                        since: last,
                        until: now,
                        runs,
                    },
                );
            }
        }
    }

    /// Delivers what is queued and stops the thread.
    pub fn stop(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

impl Observer for Notifier {
    fn on(&self, e: &RunEvent) {
        let RunEventKind::Finished { status, stats, .. } = &e.kind else {
            return;
        };
        let trigger = match status {
            RunStatus::Succeeded => Trigger::Success,
            RunStatus::Failed if stats.verified == Some(false) => Trigger::VerificationFailure,
            RunStatus::Failed => Trigger::Failure,
            _ => return,
        };
        let Ok(Some(run)) = self.state.run(e.run) else {
            return;
        };
        let log = self.state.log(e.run, 0).unwrap_or_default();
        let tail = log[log.len().saturating_sub(20)..].to_vec();
        self.tell_job(
            &e.job,
            &Notice::Run {
                trigger,
                run: Box::new(run),
                log_tail: tail,
            },
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("mail: {0}")]
    Mail(String),
    #[error("webhook {url}: {message}")]
    Webhook { url: String, message: String },
    #[error("{0}")]
    Config(String),
}

fn deliver_with_retries(target: &Target, notice: &Notice, host: &str) -> Result<(), DeliveryError> {
    let mut last = None;
    for wait in [0, 1, 5] {
        std::thread::sleep(Duration::from_secs(wait));
        match deliver(target, notice, host) {
            Ok(()) => return Ok(()),
            Err(DeliveryError::Config(m)) => return Err(DeliveryError::Config(m)),
            Err(e) => {
                tracing::warn!("notification attempt failed: {e}");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| DeliveryError::Config("no attempt made".into())))
}

/// Sends a test notice to target `name` of the configuration, once, and says how it
/// went (the dashboard's "send a test").
pub fn send_test(
    targets: &std::collections::BTreeMap<String, Target>,
    name: &str,
    by: &str,
    host: &str,
) -> Result<(), DeliveryError> {
    let target = targets
        .get(name)
        .ok_or_else(|| DeliveryError::Config(format!("no notification target {name:?}")))?;
    let notice = Notice::Test {
        by: by.to_owned(),
        at: Utc::now(),
    };
    deliver(target, &notice, host)
}

/// Sends one notice to one target, once.
pub fn deliver(target: &Target, notice: &Notice, host: &str) -> Result<(), DeliveryError> {
    match &target.kind {
        TargetKind::Email {
            server,
            from,
            to,
            username,
            password_file,
            language,
        } => {
            let msg = render(notice, host, Language::parse(language));
            send_mail(
                server,
                from,
                to,
                username.as_deref(),
                password_file.as_deref(),
                &msg,
            )
        }
        TargetKind::Webhook { url, secret_file } => {
            let body = webhook_body(notice, host).to_string();
            let secret = match secret_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .map_err(|e| DeliveryError::Config(format!("{}: {e}", f.display())))?
                        .trim_end()
                        .to_owned(),
                ),
                None => None,
            };
            post_webhook(url, &body, secret.as_deref(), event_name(notice))
        }
    }
}

fn send_mail(
    server: &str,
    from: &str,
    to: &[String],
    username: Option<&str>,
    password_file: Option<&std::path::Path>,
    msg: &Message,
) -> Result<(), DeliveryError> {
    use lettre::message::{MultiPart, SinglePart};
    use lettre::Transport;
    let bad = |e: &dyn std::fmt::Display| DeliveryError::Config(e.to_string());
    let mut builder = lettre::Message::builder()
        .from(
            from.parse()
                .map_err(|e| bad(&format!("from {from:?}: {e}")))?,
        )
        .subject(msg.subject.clone());
    for t in to {
        builder = builder.to(t.parse().map_err(|e| bad(&format!("to {t:?}: {e}")))?);
    }
    let email = builder
        .multipart(
            MultiPart::alternative()
                .singlepart(SinglePart::plain(msg.text.clone()))
                .singlepart(SinglePart::html(msg.html.clone())),
        )
        .map_err(|e| bad(&e))?;
    let mut transport = lettre::SmtpTransport::from_url(server)
        .map_err(|e| bad(&format!("server {server:?}: {e}")))?
        .timeout(Some(Duration::from_secs(30)));
    if let Some(user) = username {
        let password = match password_file {
            Some(f) => std::fs::read_to_string(f)
                .map_err(|e| bad(&format!("{}: {e}", f.display())))?
                .lines()
                .next()
                .unwrap_or("")
                .to_owned(),
            None => String::new(),
        };
        transport = transport.credentials(
            lettre::transport::smtp::authentication::Credentials::new(user.to_owned(), password),
        );
    }
    transport
        .build()
        .send(&email)
        .map(|_| ())
        .map_err(|e| DeliveryError::Mail(e.to_string()))
}

/// The HMAC-SHA256 of `body` under `secret`, as the signature header gives it.
#[must_use]
pub fn signature(secret: &str, body: &str) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(body.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn post_webhook(
    url: &str,
    body: &str,
    secret: Option<&str>,
    event: &str,
) -> Result<(), DeliveryError> {
    let mut req = ureq::post(url)
        .timeout(Duration::from_secs(30))
        .set("Content-Type", "application/json")
        .set("X-Cairn-Event", event);
    if let Some(s) = secret {
        req = req.set("X-Cairn-Signature", &signature(s, body));
    }
    req.send_string(body)
        .map(|_| ())
        .map_err(|e| DeliveryError::Webhook {
            url: url.to_owned(),
            message: e.to_string(),
        })
}

fn event_name(notice: &Notice) -> &'static str {
    match notice {
        Notice::Run { trigger, .. } => match trigger {
            Trigger::Success => "run.succeeded",
            Trigger::Failure => "run.failed",
            Trigger::VerificationFailure => "run.verification_failed",
            Trigger::Missed => "run.missed",
        },
        Notice::Missed { .. } => "run.missed",
        Notice::Verification { .. } => "verification.failed",
        Notice::Digest { .. } => "digest",
        Notice::Test { .. } => "test",
    }
}

/// The JSON a webhook receives.
#[must_use]
pub fn webhook_body(notice: &Notice, host: &str) -> Value {
    let event = event_name(notice);
    match notice {
        Notice::Run { run, log_tail, .. } => json!({
            "event": event, "host": host, "job": run.job, "run": run, "log_tail": log_tail,
        }),
        Notice::Missed { job, slot, reason } => json!({
            "event": event, "host": host, "job": job, "slot": slot, "reason": reason,
        }),
        Notice::Digest { since, until, runs } => json!({
            "event": event, "host": host, "since": since, "until": until,
            "runs": runs.len(),
            "succeeded": runs.iter().filter(|r| r.status == RunStatus::Succeeded).count(),
            "failed": runs.iter().filter(|r| r.status == RunStatus::Failed).count(),
        }),
        Notice::Test { by, at } => json!({
            "event": event, "host": host, "by": by, "at": at,
        }),
        Notice::Verification { job, verification } => json!({
            "event": event, "host": host, "job": job, "verification": verification,
        }),
    }
}

/// The languages of the mail templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    En,
    Fr,
}

impl Language {
    #[must_use]
    pub fn parse(s: &str) -> Self {
        if s == "fr" {
            Self::Fr
        } else {
            Self::En
        }
    }
}

struct Words {
    failed: &'static str,
    succeeded: &'static str,
    verify_failed: &'static str,
    missed: &'static str,
    job: &'static str,
    on: &'static str,
    status: &'static str,
    started: &'static str,
    ended: &'static str,
    duration: &'static str,
    files: &'static str,
    read: &'static str,
    new: &'static str,
    stored: &'static str,
    snapshots: &'static str,
    error: &'static str,
    log: &'static str,
    slot: &'static str,
    reason: &'static str,
    digest: &'static str,
    runs: &'static str,
    from: &'static str,
    to: &'static str,
    test: &'static str,
    by: &'static str,
    sent: &'static str,
    verification: &'static str,
    of_job: &'static str,
    snapshot: &'static str,
    source: &'static str,
    kind: &'static str,
    step: &'static str,
    steps: &'static str,
}

const EN: Words = Words {
    failed: "failed",
    succeeded: "succeeded",
    verify_failed: "failed verification",
    missed: "did not run",
    job: "job",
    on: "on",
    status: "Status",
    started: "Started",
    ended: "Ended",
    duration: "Duration",
    files: "Files",
    read: "Read",
    new: "New data",
    stored: "Stored",
    snapshots: "Snapshots",
    error: "Error",
    log: "Last log lines",
    slot: "Scheduled for",
    reason: "Why",
    digest: "backup digest",
    runs: "runs",
    from: "from",
    to: "to",
    test: "a test notification from",
    by: "Sent by",
    sent: "Sent at",
    verification: "verification",
    of_job: "of job",
    snapshot: "Snapshot",
    source: "Source",
    kind: "Test",
    step: "Failed step",
    steps: "Steps",
};

const FR: Words = Words {
    failed: "a échoué",
    succeeded: "a réussi",
    verify_failed: "a échoué à la vérification",
    missed: "ne s'est pas exécutée",
    job: "tâche",
    on: "sur",
    status: "État",
    started: "Début",
    ended: "Fin",
    duration: "Durée",
    files: "Fichiers",
    read: "Lu",
    new: "Nouvelles données",
    stored: "Stocké",
    snapshots: "Instantanés",
    error: "Erreur",
    log: "Dernières lignes du journal",
    slot: "Prévue pour",
    reason: "Raison",
    digest: "résumé des sauvegardes",
    runs: "exécutions",
    from: "du",
    to: "au",
    test: "une notification de test de",
    by: "Envoyée par",
    sent: "Envoyée le",
    verification: "vérification",
    of_job: "de la tâche",
    snapshot: "Instantané",
    source: "Source",
    kind: "Test",
    step: "Étape en échec",
    steps: "Étapes",
};

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn when(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(
        || "-".into(),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

/// The mail for `notice`, in `lang`.
#[must_use]
pub fn render(notice: &Notice, host: &str, lang: Language) -> Message {
    let w = match lang {
        Language::En => &EN,
        Language::Fr => &FR,
    };
    let human = cairn_engine::progress::human_bytes;
    let (subject, rows, pre): (String, Vec<(&str, String)>, Vec<String>) = match notice {
        Notice::Run {
            trigger,
            run,
            log_tail,
        } => {
            let verb = match trigger {
                Trigger::Success => w.succeeded,
                Trigger::VerificationFailure => w.verify_failed,
                _ => w.failed,
            };
            let s = &run.stats;
            let mut rows = vec![
                (w.status, run.status.as_str().to_owned()),
                (w.started, when(run.started_at)),
                (w.ended, when(run.ended_at)),
                (
                    w.duration,
                    format!("{:.1} s", s.duration_ms as f64 / 1000.0),
                ),
                (w.files, s.files.to_string()),
                (w.read, human(s.bytes_read)),
                (w.new, human(s.bytes_new)),
                (w.stored, human(s.bytes_stored)),
                (w.snapshots, s.snapshots.join(", ")),
            ];
            if let Some(e) = &run.error {
                rows.push((w.error, e.clone()));
            }
            (
                format!("[cairn] {} {} {verb} {} {host}", w.job, run.job, w.on),
                rows,
                log_tail
                    .iter()
                    .map(|l| format!("{} {} {}", l.at.format("%H:%M:%S"), l.level, l.message))
                    .collect(),
            )
        }
        Notice::Missed { job, slot, reason } => (
            format!("[cairn] {} {job} {} {} {host}", w.job, w.missed, w.on),
            vec![(w.slot, when(Some(*slot))), (w.reason, reason.clone())],
            Vec::new(),
        ),
        Notice::Digest { since, until, runs } => {
            let ok = runs
                .iter()
                .filter(|r| r.status == RunStatus::Succeeded)
                .count();
            let failed = runs
                .iter()
                .filter(|r| r.status == RunStatus::Failed)
                .count();
            (
                format!(
                    "[cairn] {} {host}: {} {}, {failed} {}",
                    w.digest,
                    runs.len(),
                    w.runs,
                    w.failed
                ),
                vec![
                    (w.from, when(Some(*since))),
                    (w.to, when(Some(*until))),
                    (w.succeeded, ok.to_string()),
                    (w.failed, failed.to_string()),
                ],
                runs.iter()
                    .map(|r| {
                        format!(
                            "{} {} {} {}",
                            r.id,
                            r.job,
                            r.status.as_str(),
                            r.error.as_deref().unwrap_or("")
                        )
                    })
                    .collect(),
            )
        }
        Notice::Test { by, at } => (
            format!("[cairn] {} {host}", w.test),
            vec![(w.by, by.clone()), (w.sent, when(Some(*at)))],
            Vec::new(),
        ),
        Notice::Verification {
            job,
            verification: v,
        } => (
            format!(
                "[cairn] {} {} {} {job}: {} {} {host}",
                w.verification, v.id, w.of_job, w.verify_failed, w.on
            ),
            vec![
                (w.status, v.status.as_str().to_owned()),
                (w.snapshot, v.snapshot.clone()),
                (w.source, v.source.clone()),
                (w.kind, format!("{} {}", v.kind.as_str(), v.test)),
                (w.step, v.failed_step().unwrap_or("-").to_owned()),
                (w.duration, format!("{:.1} s", v.seconds.unwrap_or(0.0))),
                (w.error, v.error.clone().unwrap_or_else(|| "-".into())),
            ],
            v.steps
                .iter()
                .map(|s| {
                    format!(
                        "{:<22} {:<8} {:>6.1}s  {}",
                        s.name,
                        format!("{:?}", s.result).to_lowercase(),
                        s.seconds,
                        s.detail.lines().next().unwrap_or("")
                    )
                })
                .collect(),
        ),
    };
    let mut text = format!("{subject}\n\n");
    for (k, v) in &rows {
        text.push_str(&format!("{k}: {v}\n"));
    }
    if !pre.is_empty() {
        text.push_str(&format!(
            "\n{}:\n",
            match notice {
                Notice::Digest { .. } => w.runs,
                Notice::Verification { .. } => w.steps,
                _ => w.log,
            }
        ));
        for l in &pre {
            text.push_str(&format!("  {l}\n"));
        }
    }
    let mut html = format!(
        "<!DOCTYPE html><html><body><h2>{}</h2><table>",
        escape(&subject)
    );
    for (k, v) in &rows {
        html.push_str(&format!(
            "<tr><th align=\"left\">{}</th><td>{}</td></tr>",
            escape(k),
            escape(v)
        ));
    }
    html.push_str("</table>");
    if !pre.is_empty() {
        html.push_str("<pre>");
        for l in &pre {
            html.push_str(&escape(l));
            html.push('\n');
        }
        html.push_str("</pre>");
    }
    html.push_str("</body></html>");
    Message {
        subject,
        text,
        html,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{RunId, RunStats, RunTrigger};

    fn failed_run() -> Run {
        Run {
            id: RunId(7),
            job: "nightly".into(),
            trigger: RunTrigger::Schedule,
            status: RunStatus::Failed,
            queued_at: Utc::now(),
            started_at: Some(Utc::now()),
            ended_at: Some(Utc::now()),
            error: Some("paths /srv: <gone> & lost".into()),
            stats: RunStats::default(),
            pid: None,
        }
    }

    #[test]
    fn a_failed_verification_names_its_snapshot_step_and_steps_escaped() {
        let v: cairn_recover::verify::Verification = serde_json::from_value(json!({
            "id": 12, "kind": "vm", "test": "boot_ping_services", "status": "failed",
            "snapshot": "ab12", "source": "h1:vm/<web>", "repository": "/r",
            "trigger": "after_backup nightly", "created": "2026-12-06T00:00:00Z",
            "finished": "2026-12-06T00:01:00Z", "seconds": 60.5,
            "steps": [
                { "name": "boot", "result": "passed", "seconds": 11.0, "detail": "login prompt" },
                { "name": "service tcp:2222", "result": "failed", "seconds": 30.0,
                  "detail": "no answer in 30 s\nmore" },
            ],
            "error": "service tcp:2222: no answer", "log": "", "cleanup_done": true, "pid": 1,
        }))
        .unwrap();
        let n = Notice::Verification {
            job: "nightly".into(),
            verification: Box::new(v),
        };
        let en = render(&n, "web1", Language::En);
        assert!(
            en.subject
                .contains("verification 12 of job nightly: failed verification on web1"),
            "{en:?}"
        );
        assert!(en.text.contains("Failed step: service tcp:2222"), "{en:?}");
        assert!(en.text.contains("Steps:\n"), "{en:?}");
        assert!(
            en.text.contains("no answer in 30 s") && !en.text.contains("more"),
            "{en:?}"
        );
        assert!(en.html.contains("h1:vm/&lt;web&gt;"), "{en:?}");
        let fr = render(&n, "web1", Language::Fr);
        assert!(
            fr.text.contains("Étape en échec: service tcp:2222"),
            "{fr:?}"
        );
        assert_eq!(webhook_body(&n, "web1")["event"], "verification.failed");
        assert_eq!(n.trigger(), Some(Trigger::VerificationFailure));
    }

    #[test]
    fn a_test_notice_says_who_sent_it_in_both_languages() {
        let n = Notice::Test {
            by: "user:<alice>".into(),
            at: Utc::now(),
        };
        let en = render(&n, "web1", Language::En);
        assert!(en.subject.contains("test notification from web1"), "{en:?}");
        assert!(en.text.contains("Sent by: user:<alice>"), "{en:?}");
        assert!(en.html.contains("user:&lt;alice&gt;"), "{en:?}");
        let fr = render(&n, "web1", Language::Fr);
        assert!(
            fr.subject.contains("notification de test de web1"),
            "{fr:?}"
        );
        assert_eq!(webhook_body(&n, "web1")["event"], "test");
        let targets = std::collections::BTreeMap::new();
        let e = send_test(&targets, "ops", "x", "web1").unwrap_err();
        assert!(e.to_string().contains("\"ops\""), "{e}");
    }

    #[test]
    fn mails_say_what_failed_in_both_languages_and_escape_html() {
        let n = Notice::Run {
            trigger: Trigger::Failure,
            run: Box::new(failed_run()),
            log_tail: vec![],
        };
        let en = render(&n, "web1", Language::En);
        assert_eq!(en.subject, "[cairn] job nightly failed on web1");
        assert!(en.text.contains("Error: paths /srv: <gone> & lost"));
        assert!(en.html.contains("&lt;gone&gt; &amp; lost") && !en.html.contains("<gone>"));
        let fr = render(&n, "web1", Language::Fr);
        assert_eq!(fr.subject, "[cairn] tâche nightly a échoué sur web1");
        assert!(fr.text.contains("Erreur: "));
    }

    #[test]
    fn a_signature_is_the_hmac_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", "what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
