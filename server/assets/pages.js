// The pages: each renders into the main element from /api/v1 answers. A page knows
// whether the session may change things (`ctx.canChange`); without that it shows no
// change buttons (the API would refuse anyway).

import * as api from "./api.js";
import { h, table, badge, replace, errorBox } from "./dom.js";
import { t, date, relative, bytes, number, percent, seconds } from "./i18n.js";
import { growthChart } from "./chart.js";

function statusBadge(s) {
  const kind = { succeeded: "ok", failed: "bad", running: "run", queued: "run", cancelled: "warn", interrupted: "bad" }[s] || "warn";
  return badge(kind, t(`status.${s}`));
}


/** The next time each job is scheduled (enabled schedules only). */
function nextRuns(schedules) {
  const next = {};
  for (const s of schedules) {
    const n = (s.next || [])[0];
    if (n && (!next[s.job] || n < next[s.job].at)) next[s.job] = { at: n, gap: gap(s.next) };
  }
  return next;
}

function gap(times) {
  if (!times || times.length < 2) return null;
  return new Date(times[1]).getTime() - new Date(times[0]).getTime();
}

/** A job is overdue when its last success is older than twice its schedule's period. */
function overdue(job, next) {
  const n = next[job.name];
  if (!n || !n.gap) return false;
  const last = job.last_run && job.last_run.status === "succeeded" ? job.last_run.ended_at : null;
  const since = last ? Date.now() - new Date(last).getTime() : Infinity;
  return since > 2 * n.gap;
}

/** Progress of a run: a live sample (files_done, bytes_done, total_bytes, rate, ETA)
 * or, once finished, its stats. */
function progressView(p, status) {
  const done = p.bytes_done ?? p.total_bytes ?? 0;
  const frac = status === "succeeded" ? 1 : p.total_bytes ? Math.min(1, done / p.total_bytes) : null;
  return h(
    "div",
    {},
    h("p", {}, statusBadge(status), " ",
      frac == null ? "" : [h("progress", { max: "1", value: String(frac), "aria-label": t("runs.progress") }), " ", h("span", { class: "percent" }, percent(frac))]),
    h("dl", { class: "facts" },
      h("dt", {}, t("runs.files")), h("dd", {}, number(p.files_done ?? p.files ?? 0)),
      h("dt", {}, t("runs.done")), h("dd", {}, bytes(done)),
      h("dt", {}, t("runs.read")), h("dd", {}, bytes(p.bytes_read || 0)),
      h("dt", {}, t("runs.stored")), h("dd", {}, bytes(p.bytes_stored || 0)),
      p.bytes_per_second ? [h("dt", {}, t("runs.rate")), h("dd", {}, `${bytes(p.bytes_per_second)}/s`)] : [],
      p.eta_seconds != null && status === "running" ? [h("dt", {}, t("runs.eta")), h("dd", {}, seconds(p.eta_seconds))] : [],
    ),
  );
}

export async function overview(main, ctx) {
  const [jobs, schedules, runs, repos] = await Promise.all([
    api.get("/jobs"),
    api.get("/schedules"),
    api.get("/runs?limit=200"),
    api.get("/repositories"),
  ]);
  const enc = encodeURIComponent;
  const [growth, protectedBy] = await Promise.all([
    Promise.all(repos.repositories.map((r) =>
      api.get(`/repositories/${enc(r.name)}/growth?days=90`).then((g) => g.samples).catch(() => []))),
    Promise.all(repos.repositories.map((r) =>
      api.get(`/repositories/${enc(r.name)}/sources`).then((g) => g.sources.map((x) => ({ ...x, repository: r.name }))).catch(() => []))),
  ]);
  const next = nextRuns(schedules.schedules);
  const finished = runs.runs.filter((r) => ["succeeded", "failed", "interrupted"].includes(r.status));
  const ok = finished.filter((r) => r.status === "succeeded").length;
  const running = runs.runs.filter((r) => r.status === "running" || r.status === "queued");
  // Each protected source (what the repositories hold, by host, source and job), then
  // the jobs that made no snapshot yet.
  const byJob = Object.fromEntries(jobs.jobs.map((j) => [j.name, j]));
  const jobCells = (j) => [
    j && j.last_run ? [statusBadge(j.last_run.status), " ", relative(j.last_run.ended_at || j.last_run.queued_at)] : "—",
    j && next[j.name] ? relative(next[j.name].at) : t("overview.unscheduled"),
  ];
  const held = protectedBy.flat();
  const sources = held.map((p) => {
    const j = p.job ? byJob[p.job] : null;
    const n = p.job ? next[p.job] : null;
    const late = n && n.gap && Date.now() - new Date(p.newest_time).getTime() > 2 * n.gap;
    return [
      h("span", { class: "source" }, h("span", { class: "badge" }, t(`snapkind.${p.kind}`)), " ", p.source),
      p.host,
      p.job ? (j ? h("a", { href: `#/jobs/${enc(p.job)}` }, p.job) : p.job) : "—",
      h("a", { href: `#/browse/${enc(p.repository)}/${enc(p.newest_id)}/%2F`, class: "newest" }, relative(p.newest_time)),
      ...jobCells(j),
      late ? badge("bad", t("overview.overdue")) : "",
    ];
  });
  for (const j of jobs.jobs.filter((j) => !held.some((p) => p.job === j.name))) {
    sources.push([
      h("span", { class: "source" }, j.definition.source.map((s) => s.type).join(", ")),
      j.definition.host || "—",
      h("a", { href: `#/jobs/${enc(j.name)}` }, j.name),
      badge("warn", t("overview.never")),
      ...jobCells(j),
      overdue(j, next) ? badge("bad", t("overview.overdue")) : "",
    ]);
  }
  replace(
    main,
    h("h1", {}, t("overview.title")),
    h(
      "section",
      { class: "cards" },
      h("div", { class: "card" }, h("h2", {}, t("overview.success")), h("p", { class: "big", id: "success-rate" }, finished.length ? percent(ok / finished.length) : "—"), h("p", {}, t("overview.of_runs", { n: number(finished.length) }))),
      repos.repositories.map((r, i) =>
        h(
          "div",
          { class: "card" },
          h("h2", {}, t("overview.repository", { name: r.name })),
          r.status === "ok"
            ? [
                h("p", { class: "big" }, bytes(r.figures.size_bytes)),
                h("p", {}, t("overview.repo_figures", { snapshots: number(r.figures.snapshots), dedup: number(r.figures.dedup_ratio, 1), compression: number(r.figures.compression_ratio, 1) })),
                h("h3", { class: "small" }, t("overview.growth")),
                growthChart(growth[i], `growth-${r.name}`),
              ]
            : errorBox({ message: r.error }),
        ),
      ),
    ),
    h("h2", {}, t("overview.sources")),
    table([t("col.source"), t("col.host"), t("col.job"), t("overview.newest"), t("col.last_run"), t("col.next_run"), ""], sources, t("overview.no_jobs")),
    h("h2", {}, t("overview.running")),
    table(
      [t("col.run"), t("col.job"), t("col.status"), t("col.started"), t("runs.progress")],
      running.map((r) => [h("a", { href: `#/runs/${r.id}` }, `#${r.id}`), r.job, statusBadge(r.status), relative(r.started_at || r.queued_at), liveProgress(r, ctx)]),
      t("overview.nothing_running"),
    ),
  );
}

/** A running run's progress bar and rate, fed by its event stream while the page shows. */
function liveProgress(run, ctx) {
  const el = h("span", { class: "live-progress", "data-run": run.id }, "—");
  const es = new EventSource(`/api/v1/runs/${run.id}/events`);
  es.addEventListener("progress", (ev) => {
    const p = JSON.parse(ev.data);
    const done = p.bytes_done || 0;
    const frac = p.total_bytes ? Math.min(1, done / p.total_bytes) : null;
    replace(el,
      frac == null ? "" : [h("progress", { max: "1", value: String(frac), "aria-label": t("runs.progress") }), " ", percent(frac), " · "],
      bytes(done), p.bytes_per_second ? ` · ${bytes(p.bytes_per_second)}/s` : "",
      p.eta_seconds != null ? ` · ${t("runs.eta")} ${seconds(p.eta_seconds)}` : "");
  });
  es.addEventListener("finished", (ev) => {
    replace(el, statusBadge(JSON.parse(ev.data).status));
    es.close();
  });
  ctx.onLeave(() => es.close());
  return el;
}

export async function jobs(main, ctx) {
  const [jobs, schedules] = await Promise.all([api.get("/jobs"), api.get("/schedules")]);
  const next = nextRuns(schedules.schedules);
  const msg = h("p", { role: "status", "aria-live": "polite" });
  const runNow = (name) => async (ev) => {
    ev.target.disabled = true;
    try {
      const r = await api.post(`/jobs/${encodeURIComponent(name)}/run`);
      location.hash = `#/runs/${r.run}`;
    } catch (e) {
      replace(msg, errorBox(e));
      ev.target.disabled = false;
    }
  };
  replace(
    main,
    h("h1", {}, t("jobs.title")),
    ctx.canChange ? h("p", { class: "actions" }, h("a", { href: "#/job-form", id: "new-job", class: "button" }, t("jobs.new"))) : "",
    msg,
    table(
      [t("col.job"), t("col.repository"), t("col.last_run"), t("col.next_run"), ""],
      jobs.jobs.map((j) => [
        h("a", { href: `#/jobs/${encodeURIComponent(j.name)}` }, j.name),
        j.definition.repository || "default",
        j.last_run ? [statusBadge(j.last_run.status), " ", relative(j.last_run.ended_at || j.last_run.queued_at)] : "—",
        next[j.name] ? date(next[j.name].at) : t("overview.unscheduled"),
        ctx.canChange ? h("button", { type: "button", class: "run-now", onclick: runNow(j.name) }, t("jobs.run_now")) : "",
      ]),
      t("overview.no_jobs"),
    ),
  );
}

export async function job(main, ctx, name) {
  const enc = encodeURIComponent;
  const [j, runs, schedules] = await Promise.all([
    api.get(`/jobs/${enc(name)}`),
    api.get(`/runs?job=${enc(name)}&limit=50`),
    api.get("/schedules"),
  ]);
  const msg = h("div", { role: "status", "aria-live": "polite", id: "job-msg" });
  const fromApi = j.origin !== "config";
  const mine = schedules.schedules.filter((s) => s.job === name);
  const toggle = (s) => async (ev) => {
    ev.target.disabled = true;
    try {
      await api.post(`/schedules/${s.id}/${s.enabled ? "disable" : "enable"}`);
      ctx.redraw();
    } catch (e) {
      replace(msg, errorBox(e));
      ev.target.disabled = false;
    }
  };
  const askDelete = () => replace(msg, h("div", { class: "preview" },
    h("p", {}, t("jobs.delete_confirm", { name, n: mine.length })),
    h("button", { type: "button", class: "danger", id: "delete-job-confirm", onclick: async (ev) => {
      ev.target.disabled = true;
      try {
        await api.del(`/jobs/${enc(name)}`);
        location.hash = "#/jobs";
      } catch (e) {
        replace(msg, errorBox(e));
      }
    } }, t("jobs.delete_now")),
    " ", h("button", { type: "button", class: "link", onclick: () => replace(msg) }, t("form.cancel"))));
  const runNow = async (ev) => {
    ev.target.disabled = true;
    try {
      const r = await api.post(`/jobs/${enc(name)}/run`);
      location.hash = `#/runs/${r.run}`;
    } catch (e) {
      replace(msg, errorBox(e));
      ev.target.disabled = false;
    }
  };
  replace(
    main,
    h("h1", {}, t("jobs.job", { name })),
    ctx.canChange
      ? h("div", { class: "actions" },
          h("button", { type: "button", id: "job-run-now", onclick: runNow }, t("jobs.run_now")),
          fromApi ? h("a", { href: `#/job-form/${enc(name)}`, id: "edit-job", class: "button secondary" }, t("jobs.edit")) : "",
          fromApi ? h("button", { type: "button", id: "delete-job", class: "danger", onclick: askDelete }, t("jobs.delete")) : "",
          fromApi ? "" : h("span", { class: "hint" }, t("jobs.from_config")))
      : "",
    msg,
    h("h2", {}, t("jobs.schedules")),
    table(
      [t("sched.expression"), t("sched.timezone"), t("col.next_run"), t("col.status"), ""],
      mine.map((s) => [
        h("code", {}, s.when), s.timezone || "UTC", s.enabled && s.next && s.next[0] ? date(s.next[0]) : "—",
        s.enabled ? badge("ok", t("sched.enabled")) : badge("warn", t("sched.disabled")),
        ctx.canChange ? h("button", { type: "button", class: "secondary toggle-schedule", onclick: toggle(s) }, t(s.enabled ? "sched.disable" : "sched.enable")) : "",
      ]),
      t("overview.unscheduled"),
    ),
    h("h2", {}, t("jobs.definition")),
    h("pre", { class: "definition" }, JSON.stringify(j.definition || j.job || j, null, 2)),
    h("h2", {}, t("jobs.history")),
    runTable(runs.runs),
  );
}

function runTable(runs) {
  return table(
    [t("col.run"), t("col.job"), t("col.status"), t("col.started"), t("col.duration"), t("col.data")],
    runs.map((r) => [
      h("a", { href: `#/runs/${r.id}` }, `#${r.id}`),
      r.job,
      statusBadge(r.status),
      date(r.started_at || r.queued_at),
      r.ended_at && r.started_at ? seconds((new Date(r.ended_at) - new Date(r.started_at)) / 1000) : "—",
      bytes((r.stats || {}).bytes_done || 0),
    ]),
    t("runs.none"),
  );
}

export async function runs(main) {
  const r = await api.get("/runs?limit=100");
  replace(main, h("h1", {}, t("runs.title")), runTable(r.runs));
}

export async function run(main, ctx, id) {
  const [r, log] = await Promise.all([api.get(`/runs/${id}`), api.get(`/runs/${id}/log`)]);
  const live = h("div", { id: "run-progress", "aria-live": "polite" });
  const show = (p, status) => replace(live, progressView(p, status));
  show(r.progress || r.run.stats || {}, r.run.status);
  const level = h("select", { id: "log-level", "aria-label": t("runs.log_filter") },
    ["all", "error", "warn", "info"].map((l) => h("option", { value: l }, t(`log.${l}`))));
  const lines = h("ol", { class: "log" });
  const entries = log.log || [];
  const drawLog = () => {
    const want = level.value;
    replace(lines, entries
      .filter((l) => want === "all" || l.level === want)
      .map((l) => h("li", { class: `log-${l.level}` }, `${date(l.at)} ${l.level} ${l.message}`)));
  };
  level.addEventListener("change", drawLog);
  drawLog();
  const cancel = ctx.canChange && ["running", "queued"].includes(r.run.status)
    ? h("button", { type: "button", id: "cancel-run", onclick: async (ev) => {
        ev.target.disabled = true;
        await api.post(`/runs/${id}/cancel`).catch(() => {});
      } }, t("runs.cancel"))
    : "";
  replace(main, h("h1", {}, t("runs.run", { id, job: r.run.job })), live, cancel, h("h2", {}, t("runs.log")), level, lines);
  if (["running", "queued"].includes(r.run.status)) {
    const es = new EventSource(`/api/v1/runs/${id}/events`);
    es.addEventListener("progress", (ev) => show(JSON.parse(ev.data), "running"));
    es.addEventListener("message", (ev) => {
      const e = JSON.parse(ev.data);
      entries.push({ at: new Date().toISOString(), level: e.level, message: e.text });
      drawLog();
    });
    const finished = (stats, status) => {
      show(stats, status);
      if (cancel) cancel.remove();
      es.close();
    };
    es.addEventListener("finished", (ev) => {
      const e = JSON.parse(ev.data);
      finished(e.stats, e.status);
    });
    // A run that ended before the stream opened sends no event: ask once it is open.
    es.addEventListener("open", async () => {
      const now = await api.get(`/runs/${id}`);
      if (!["running", "queued"].includes(now.run.status)) finished(now.run.stats, now.run.status);
    }, { once: true });
    ctx.onLeave(() => es.close());
  }
}

export async function settings(main, ctx) {
  const { languages, current, load } = await import("./i18n.js");
  const [tokens, notifications] = await Promise.all([api.get("/tokens"), api.get("/notifications")]);
  const select = h(
    "select",
    { id: "language", onchange: async (e) => { await load(e.target.value); ctx.redraw(); } },
    languages().map((l) => h("option", { value: l, selected: l === current() }, t(`lang.${l}`))),
  );
  const enc = encodeURIComponent;
  const tokenMsg = h("div", { id: "token-msg", role: "status", "aria-live": "polite" });
  const revoke = (name) => async (ev) => {
    ev.target.disabled = true;
    try {
      await api.del(`/tokens/${enc(name)}`);
      ctx.redraw();
    } catch (e) {
      replace(tokenMsg, errorBox(e));
      ev.target.disabled = false;
    }
  };
  const newName = h("input", { id: "token-name", autocomplete: "off", pattern: "[A-Za-z0-9._-]{1,64}", required: true });
  const newRo = h("input", { type: "checkbox", id: "token-read-only" });
  const create = async (ev) => {
    ev.preventDefault();
    replace(tokenMsg);
    try {
      const r = await api.post("/tokens", { name: newName.value.trim(), read_only: newRo.checked });
      newName.value = "";
      const secret = h("input", { id: "token-secret", class: "connection", readonly: true, value: r.token, size: 70, "aria-label": t("settings.token_secret") });
      replace(tokenMsg, h("div", { class: "preview" },
        h("p", {}, h("strong", {}, t("settings.token_once", { name: r.name }))), secret));
      secret.select();
      const list = await api.get("/tokens");
      replace(tokenTable, drawTokens(list.tokens));
    } catch (e) {
      replace(tokenMsg, errorBox(e));
    }
  };
  const drawTokens = (list) => table(
    [t("col.name"), t("settings.rights"), t("settings.created"), t("settings.last_used"), ""],
    list.map((k) => [
      k.name, k.read_only ? t("settings.read_only") : t("settings.read_write"), date(k.created), k.last_used ? relative(k.last_used) : "—",
      ctx.canChange ? h("button", { type: "button", class: "danger revoke", "data-token": k.name, onclick: revoke(k.name) }, t("settings.revoke")) : "",
    ]),
    t("settings.no_tokens"),
  );
  const tokenTable = h("div", { id: "tokens" }, drawTokens(tokens.tokens));
  const sendTest = (name) => async (ev) => {
    const out = ev.target.parentElement.querySelector(".test-result");
    ev.target.disabled = true;
    replace(out, t("settings.sending"));
    try {
      await api.post(`/notifications/${enc(name)}/test`);
      replace(out, h("span", { class: "ok" }, t("settings.delivered")));
    } catch (e) {
      replace(out, h("span", { class: "error" }, e.message));
    } finally {
      ev.target.disabled = false;
    }
  };
  replace(
    main,
    h("h1", {}, t("settings.title")),
    h("label", { for: "language" }, t("settings.language")),
    " ",
    select,
    h("p", {}, t("settings.session", { name: ctx.session.name, until: date(ctx.session.expires) })),
    h("h2", {}, t("settings.tokens")),
    tokenTable,
    ctx.canChange
      ? h("form", { id: "token-form", class: "actions", onsubmit: create },
          h("label", { for: "token-name" }, t("settings.token_name")), newName,
          h("label", { class: "check", for: "token-read-only" }, newRo, " ", t("settings.read_only")),
          h("button", { type: "submit", id: "token-create" }, t("settings.create_token")))
      : "",
    tokenMsg,
    h("h2", {}, t("settings.notifications")),
    table(
      [t("col.name"), t("settings.kind"), t("settings.on"), ""],
      notifications.notifications.map((n) => [
        n.name, n.kind, n.on.join(", "),
        ctx.canChange
          ? h("span", { class: "actions" }, h("button", { type: "button", class: "secondary send-test", "data-target": n.name, onclick: sendTest(n.name) }, t("settings.send_test")),
              h("span", { class: "test-result", role: "status" }))
          : "",
      ]),
      t("form.no_notifications"),
    ),
  );
}

/** The bar of active recovery sessions, on every page. Redrawn in place every few
 * seconds: a session's line and its buttons stay the same elements while it lives, so
 * a click never lands on a line being replaced. */
const lines = new Map();

export async function taskbar(el, ctx) {
  let sessions;
  try {
    sessions = (await api.get("/recovery")).sessions;
  } catch {
    return;
  }
  el.hidden = sessions.length === 0;
  if (!el.querySelector("ul.sessions")) {
    lines.clear();
    replace(el, h("strong", { class: "title" }), h("ul", { class: "sessions" }));
  }
  replace(el.querySelector("strong.title"), t("taskbar.title", { n: sessions.length }));
  const list = el.querySelector("ul.sessions");
  const live = new Set(sessions.map((s) => s.id));
  for (const [id, line] of lines) {
    if (!live.has(id) || line.canChange !== ctx.canChange || line.lang !== document.documentElement.lang) {
      line.li.remove();
      lines.delete(id);
    }
  }
  for (const s of sessions) {
    let line = lines.get(s.id);
    if (!line) {
      line = sessionLine(s, el, ctx);
      lines.set(s.id, line);
      list.append(line.li);
    }
    replace(line.facts, " · ", relative(s.created), " · ", t("taskbar.written", { size: bytes(s.layer_bytes || 0) }));
  }
}

function sessionLine(s, el, ctx) {
  const facts = h("span", { class: "facts" });
  const stop = async (ev) => {
    ev.target.disabled = true;
    try {
      await api.post(`/recovery/${encodeURIComponent(s.id)}/stop`);
    } finally {
      taskbar(el, ctx);
    }
  };
  const li = h("li", { class: "session", "data-session": s.id },
    h("span", {}, `${s.engine || "vm"} ${(s.snapshot || "").slice(0, 8)}`),
    facts,
    s.port ? [" · ", h("code", { class: "where" }, where(s))] : "",
    s.domain ? [" · ", h("code", {}, s.domain)] : "",
    revealed.has(s.id) ? connectionInput(revealed.get(s.id)) : "",
    ctx.canChange && s.port ? h("button", { type: "button", class: "secondary copy-connection", onclick: copyConnection(s.id) }, t("taskbar.copy")) : "",
    ctx.canChange ? h("button", { type: "button", class: "stop", onclick: stop }, t("taskbar.stop")) : "",
  );
  return { li, facts, canChange: ctx.canChange, lang: document.documentElement.lang };
}

/** A session's address without its password (the listing has none). */
function where(s) {
  const scheme = s.engine === "postgresql" ? "postgresql" : "mariadb";
  return `${scheme}://${s.user || ""}@127.0.0.1:${s.port}/${s.database || ""}`;
}

/** Connection strings this page asked for, by session: the bar's redraws keep them. */
const revealed = new Map();

function connectionInput(connection) {
  return h("input", { class: "connection", readonly: true, value: connection, size: Math.min(connection.length, 60), "aria-label": t("recover.connection") });
}

/** Asks the API for the connection string (audited), shows it selected and copies it. */
function copyConnection(id) {
  return async (ev) => {
    const li = ev.target.closest("li");
    try {
      const r = await api.post(`/recovery/${encodeURIComponent(id)}/connection`);
      revealed.set(id, r.connection);
      const box = connectionInput(r.connection);
      li.querySelector("input.connection")?.remove();
      ev.target.before(box);
      box.select();
      try {
        await navigator.clipboard.writeText(r.connection);
      } catch {
        document.execCommand("copy");
      }
      ev.target.textContent = t("recover.copied");
    } catch (e) {
      ev.target.textContent = e.message;
    }
  };
}
