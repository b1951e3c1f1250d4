// The job form (#/job-form for a new job, #/job-form/<name> to change one): what to back up (the host's VMs and
// databases to tick, paths), the repository, a schedule with its next five runs
// previewed as it is typed, retention with a dry run of what it would forget now, and
// notifications. The API checks everything: its error names the field, shown beside
// that field, and nothing typed is lost.

import * as api from "./api.js";
import { h, replace, errorBox } from "./dom.js";
import { t, date } from "./i18n.js";

const enc = encodeURIComponent;
const DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const KEEPS = ["last", "hourly", "daily", "weekly", "monthly", "yearly"];
/** The form's sections, each with its error line; an API error names one of them. */
const SECTIONS = ["name", "repository", "source", "schedule", "retention", "verify", "notify", "tags"];

/** The schedule's fields read back from a stored expression the form can show. */
function scheduleFields(when) {
  const w = (when || "").trim().split(/\s+/);
  if (!when) return { kind: "none", time: "02:00" };
  if (w[0] === "daily" && w.length === 2) return { kind: "daily", time: w[1] };
  if (w[0] === "weekly" && w.length === 3 && DAYS.includes(w[1])) return { kind: "weekly", day: w[1], time: w[2] };
  if (w[0] === "monthly" && w.length === 3) return { kind: "monthly", dom: w[1], time: w[2] };
  return { kind: "cron", cron: when };
}

/** The expression the schedule's fields mean (empty: no schedule). */
function expression(f) {
  switch (f.kind.value) {
    case "daily": return `daily ${f.time.value.trim()}`;
    case "weekly": return `weekly ${f.day.value} ${f.time.value.trim()}`;
    case "monthly": return `monthly ${f.dom.value.trim()} ${f.time.value.trim()}`;
    case "cron": return f.cron.value.trim();
    default: return "";
  }
}

function field(id, label, input, hint) {
  return h("div", { class: "field" }, h("label", { for: id }, label), input, hint ? h("small", { class: "hint" }, hint) : "");
}

function check(id, name, value, label, checked) {
  return h("label", { class: "check", for: id },
    h("input", { type: "checkbox", id, name, value, checked: checked || false }), " ", label);
}

export async function form(main, ctx, name) {
  if (!ctx.canChange) throw new Error(t("form.read_only"));
  const editing = name != null;
  const [repos, vms, dbs, notifications, current, schedules] = await Promise.all([
    api.get("/repositories"),
    api.get("/vms").catch((e) => ({ error: e.message })),
    api.get("/databases").catch((e) => ({ error: e.message })),
    api.get("/notifications"),
    editing ? api.get(`/jobs/${enc(name)}`) : null,
    api.get("/schedules"),
  ]);
  const def = current ? current.definition : { name: "", repository: "default", source: [] };
  const mine = schedules.schedules.filter((s) => s.job === name);
  const editable = mine.filter((s) => s.origin !== "config");
  const sources = def.source || def.sources || [];
  const ticked = (type) => sources.filter((s) => s.type === type);

  const errs = Object.fromEntries(SECTIONS.map((s) => [s, h("p", { class: "error field-error", id: `err-${s}`, role: "alert" })]));
  const general = h("p", { class: "error", id: "form-error", role: "alert" });

  // What: the repository, VMs, databases, paths.
  const nameIn = h("input", { id: "job-name", name: "name", value: def.name, required: true, readonly: editing, autocomplete: "off",
    pattern: "[A-Za-z0-9._-]{1,64}" });
  const repoIn = h("select", { id: "job-repository", name: "repository" },
    repos.repositories.map((r) => h("option", { value: r.name, selected: r.name === (def.repository || "default") }, r.name)));
  const vmNames = new Set(ticked("vm").flatMap((s) => s.names));
  const vmList = vms.error
    ? h("p", { class: "empty", id: "vms-unavailable" }, t("form.vms_unavailable", { error: vms.error }))
    : vms.vms.length
      ? h("div", { class: "checks", id: "vm-choices" }, vms.vms.map((v) => check(`vm-${v.name}`, "vm", v.name, `${v.name} (${v.state})`, vmNames.has(v.name))))
      : h("p", { class: "empty" }, t("form.no_vms"));
  const dbTypes = { postgresql: "postgres", mariadb: "mariadb" };
  const dbList = dbs.error
    ? h("p", { class: "empty" }, dbs.error)
    : dbs.databases.length
      ? h("div", { class: "checks", id: "db-choices" }, dbs.databases.map((d) =>
          check(`db-${d.engine}`, "db", d.engine, t(`form.db_${d.engine}`, { where: d.location }), ticked(dbTypes[d.engine]).length > 0)))
      : h("p", { class: "empty" }, t("form.no_databases"));
  const pathSource = ticked("paths")[0] || { paths: [], excludes: [] };
  const pathsIn = h("textarea", { id: "job-paths", name: "paths", rows: 3, placeholder: "/etc\n/home" });
  pathsIn.value = pathSource.paths.join("\n");
  const excludesIn = h("textarea", { id: "job-excludes", name: "excludes", rows: 2, placeholder: "*.tmp" });
  excludesIn.value = (pathSource.excludes || []).join("\n");
  // Sources the form does not show (images, NBD, commands) are kept as they are.
  const kept = sources.filter((s) => !["vm", "postgres", "mariadb", "paths"].includes(s.type));

  // When: the schedule, previewed as it is typed.
  const s0 = scheduleFields(editable[0] && editable[0].when);
  const sf = {
    kind: h("select", { id: "sched-kind", name: "schedule" },
      ["none", "daily", "weekly", "monthly", "cron"].map((k) => h("option", { value: k, selected: k === s0.kind }, t(`sched.${k}`)))),
    time: h("input", { id: "sched-time", name: "time", value: s0.time || "02:00", inputmode: "numeric", size: 6, placeholder: "02:00" }),
    day: h("select", { id: "sched-day", name: "day" }, DAYS.map((d) => h("option", { value: d, selected: d === s0.day }, t(`day.${d}`)))),
    dom: h("input", { id: "sched-dom", name: "dom", type: "number", min: 1, max: 31, value: s0.dom || "1" }),
    cron: h("input", { id: "sched-cron", name: "cron", value: s0.cron || "", placeholder: "0 2 * * *", autocomplete: "off" }),
    tz: h("input", { id: "sched-tz", name: "timezone", value: (editable[0] && editable[0].timezone) || "", placeholder: "Europe/Paris", autocomplete: "off" }),
  };
  const preview = h("ol", { id: "sched-preview", class: "preview-list", "aria-live": "polite" });
  const parts = {
    time: field("sched-time", t("sched.time"), sf.time),
    day: field("sched-day", t("sched.day"), sf.day),
    dom: field("sched-dom", t("sched.dom"), sf.dom),
    cron: field("sched-cron", t("sched.expression"), sf.cron, t("sched.expression_hint")),
    tz: field("sched-tz", t("sched.timezone"), sf.tz),
  };
  const showParts = () => {
    const k = sf.kind.value;
    parts.time.hidden = !["daily", "weekly", "monthly"].includes(k);
    parts.day.hidden = k !== "weekly";
    parts.dom.hidden = k !== "monthly";
    parts.cron.hidden = k !== "cron";
    parts.tz.hidden = k === "none";
  };
  let asked = 0;
  const previewNow = async () => {
    showParts();
    const when = expression(sf);
    const mineAsk = ++asked;
    replace(errs.schedule);
    if (!when) return replace(preview);
    try {
      const tz = sf.tz.value.trim();
      const r = await api.get(`/schedules/preview?when=${enc(when)}&count=5${tz ? `&timezone=${enc(tz)}` : ""}`);
      if (mineAsk !== asked) return;
      replace(preview, r.next.map((at) => h("li", {}, h("time", { datetime: at }, date(at)))));
      return true;
    } catch (e) {
      if (mineAsk !== asked) return;
      replace(preview);
      replace(errs.schedule, e.message);
      return false;
    }
  };
  let timer = null;
  const soon = () => { clearTimeout(timer); timer = setTimeout(previewNow, 250); };
  // The kind's own fields show at once; the preview follows the typing.
  sf.kind.addEventListener("change", showParts);
  for (const el of Object.values(sf)) {
    el.addEventListener("input", soon);
    el.addEventListener("change", soon);
  }
  ctx.onLeave(() => clearTimeout(timer));

  // Retention, with a dry run against the repository's snapshots of this job.
  const r = def.retention || {};
  const keepIn = Object.fromEntries(KEEPS.map((k) => [k, h("input", { id: `keep-${k}`, name: `keep_${k}`, type: "number", min: 0, step: 1,
    value: r[`keep_${k}`] || "", inputmode: "numeric", size: 4 })]));
  const withinIn = h("input", { id: "keep-within", name: "keep_within", value: r.keep_within || "", placeholder: "30d", size: 6 });
  const pruneIn = h("input", { type: "checkbox", id: "keep-prune", name: "prune", checked: def.retention ? r.prune !== false : true });
  const dryOut = h("div", { id: "retention-result", class: "preview", hidden: true, "aria-live": "polite" });

  // Who hears about it.
  const notifyList = notifications.notifications.length
    ? h("div", { class: "checks" }, notifications.notifications.map((n) =>
        check(`notify-${n.name}`, "notify", n.name, `${n.name} (${n.kind})`, (def.notify || []).includes(n.name))))
    : h("p", { class: "empty" }, t("form.no_notifications"));
  const tagsIn = h("input", { id: "job-tags", name: "tags", value: (def.tags || []).join(", "), placeholder: "nightly, prod" });

  // Proof by use: each backup's snapshots verified after the run (docs/VERIFY.md); the
  // rest of a job's [verify] (its check, how snapshots are verified) is kept as it was.
  const verifyAfterIn = h("input", { type: "checkbox", id: "verify-after", name: "verify_after", checked: !!(def.verify && def.verify.after_backup) });

  const definition = () => {
    const lines = (el) => el.value.split("\n").map((x) => x.trim()).filter(Boolean);
    const picked = (n) => [...main.querySelectorAll(`input[name="${n}"]:checked`)].map((i) => i.value);
    const source = [...kept];
    const vmsTicked = picked("vm");
    if (vmsTicked.length) source.push({ type: "vm", names: vmsTicked });
    for (const engine of picked("db")) {
      const type = dbTypes[engine];
      const before = ticked(type)[0];
      source.push(before || (type === "postgres" ? { type, connection: "" } : { type }));
    }
    if (lines(pathsIn).length) source.push({ type: "paths", paths: lines(pathsIn), excludes: lines(excludesIn) });
    const job = { name: nameIn.value.trim(), repository: repoIn.value, source };
    const tags = tagsIn.value.split(",").map((x) => x.trim()).filter(Boolean);
    if (tags.length) job.tags = tags;
    const keeps = {};
    for (const k of KEEPS) {
      const v = keepIn[k].value.trim();
      if (v !== "") keeps[`keep_${k}`] = Number(v);
    }
    if (withinIn.value.trim()) keeps.keep_within = withinIn.value.trim();
    if (Object.keys(keeps).length) job.retention = { ...keeps, prune: pruneIn.checked };
    const notify = picked("notify");
    if (notify.length) job.notify = notify;
    if (def.verify || verifyAfterIn.checked) {
      job.verify = { ...(def.verify || {}), after_backup: verifyAfterIn.checked };
      if (!verifyAfterIn.checked) delete job.verify.after_backup;
    }
    if (def.host) job.host = def.host;
    return job;
  };

  /** The field the browser itself finds wrong (a negative count, a bad name), or null. */
  const localProblem = () => {
    if (!nameIn.checkValidity()) return ["name", t("form.bad_name")];
    for (const k of KEEPS) if (!keepIn[k].checkValidity()) return ["retention", t("form.bad_keep", { rule: `keep_${k}` })];
    return null;
  };

  const clearErrors = () => {
    for (const e of Object.values(errs)) replace(e);
    replace(general);
    for (const el of main.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  };

  /** Puts an API error beside the field it names (`job "x": retention: ...`). */
  const showError = (message) => {
    const m = message.replace(/^job "[^"]*": /, "");
    const head = m.split(":")[0].trim().split(/[ .]/)[0];
    const target = SECTIONS.includes(head) ? errs[head] : general;
    replace(target, m);
    target.closest("fieldset")?.setAttribute("aria-invalid", "true");
    target.scrollIntoView({ block: "center" });
  };

  const dryRun = async (ev) => {
    ev.preventDefault();
    clearErrors();
    const bad = localProblem();
    if (bad) return showError(`${bad[0]}: ${bad[1]}`);
    try {
      const res = await api.post("/jobs?dry_run=true", definition());
      const p = res.plan;
      dryOut.hidden = false;
      replace(dryOut,
        h("p", { id: "would-forget" }, p.would_forget.length
          ? t("form.would_forget", { n: p.would_forget.length })
          : t("form.would_forget_none")),
        p.would_forget.length ? h("ul", { class: "ids" }, p.would_forget.map((id) => h("li", {}, h("code", {}, id.slice(0, 8))))) : "",
        p.sources.filter((s) => s.problem).map((s) => h("p", { class: "warn" }, `${s.source}: ${s.problem}`)),
        p.would_prune && p.would_forget.length ? h("p", {}, t("form.would_prune")) : "");
    } catch (e) {
      dryOut.hidden = true;
      showError(e.message);
    }
  };

  const save = async (ev) => {
    ev.preventDefault();
    clearErrors();
    const submit = ev.submitter || main.querySelector("#job-save");
    submit.disabled = true;
    try {
      // Every field the browser or the schedule check finds wrong, named at once.
      const bad = localProblem();
      if (bad) showError(`${bad[0]}: ${bad[1]}`);
      const when = expression(sf);
      const scheduleOk = !when || (await previewNow());
      if (!scheduleOk) errs.schedule.closest("fieldset").setAttribute("aria-invalid", "true");
      if (bad || !scheduleOk) return;
      const job = definition();
      await api.post(`/jobs${editing ? "?replace=true" : ""}`, job);
      const tz = sf.tz.value.trim() || null;
      const same = editable.length === 1 && editable[0].when === when && (editable[0].timezone || null) === tz;
      if (!same) {
        for (const s of editable) await api.del(`/schedules/${s.id}`);
        if (when) await api.post("/schedules", { job: job.name, when, timezone: tz });
      }
      location.hash = `#/jobs/${enc(job.name)}`;
    } catch (e) {
      showError(e.message);
    } finally {
      submit.disabled = false;
    }
  };

  replace(
    main,
    h("h1", {}, editing ? t("form.edit_title", { name }) : t("form.new_title")),
    h("form", { id: "job-form", class: "job-form", onsubmit: save, novalidate: true },
      h("fieldset", {}, h("legend", {}, t("form.what")),
        field("job-name", t("form.name"), nameIn, editing ? "" : t("form.name_hint")), errs.name,
        field("job-repository", t("col.repository"), repoIn), errs.repository,
        h("h3", {}, t("form.vms")), vmList,
        h("h3", {}, t("form.databases")), dbList,
        field("job-paths", t("form.paths"), pathsIn, t("form.paths_hint")),
        field("job-excludes", t("form.excludes"), excludesIn),
        kept.length ? h("p", { class: "hint" }, t("form.kept_sources", { list: kept.map((s) => s.type).join(", ") })) : "",
        errs.source),
      h("fieldset", {}, h("legend", {}, t("form.when")),
        field("sched-kind", t("sched.kind"), sf.kind), parts.time, parts.day, parts.dom, parts.cron, parts.tz,
        mine.length > editable.length ? h("p", { class: "hint" }, t("form.config_schedules")) : "",
        errs.schedule,
        h("h3", {}, t("sched.next_five")), preview),
      h("fieldset", {}, h("legend", {}, t("form.retention")),
        h("div", { class: "keeps" }, KEEPS.map((k) => field(`keep-${k}`, t(`keep.${k}`), keepIn[k])),
          field("keep-within", t("keep.within"), withinIn)),
        h("label", { for: "keep-prune", class: "check" }, pruneIn, " ", t("keep.prune")),
        errs.retention,
        h("button", { type: "button", id: "retention-preview", class: "secondary", onclick: dryRun }, t("form.dry_run")),
        dryOut),
      h("fieldset", {}, h("legend", {}, t("form.verify")),
        h("label", { for: "verify-after", class: "check" }, verifyAfterIn, " ", t("form.verify_after")),
        h("p", { class: "hint" }, t("form.verify_hint")), errs.verify),
      h("fieldset", {}, h("legend", {}, t("form.notify")), notifyList, errs.notify,
        field("job-tags", t("form.tags"), tagsIn), errs.tags),
      general,
      h("div", { class: "actions" },
        h("button", { type: "submit", id: "job-save" }, t("form.save")),
        h("a", { href: editing ? `#/jobs/${enc(name)}` : "#/jobs", id: "job-cancel" }, t("form.cancel")))),
  );
  showParts();
  previewNow();
}
