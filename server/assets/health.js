// Repository health: each repository's figures, its last checks (kept by the daemon),
// the host's verifications of snapshots (verifications.js),
// its locks (stale ones marked, with a
// button that removes them), a check and a prune whose dry run shows what it would free
// before anything is deleted.

import * as api from "./api.js";
import { h, table, badge, replace, errorBox } from "./dom.js";
import { t, date, relative, bytes, number } from "./i18n.js";
import { verificationsSection } from "./verifications.js";

const enc = encodeURIComponent;

export async function health(main, ctx) {
  const repos = (await api.get("/repositories")).repositories;
  const [verified, ...sections] = await Promise.all([verificationsSection(), ...repos.map((r) => repository(r, ctx))]);
  replace(main, h("h1", {}, t("health.title")), sections, verified);
}

async function repository(r, ctx) {
  const base = `/repositories/${enc(r.name)}`;
  const locksEl = h("div", { class: "locks" });
  const result = h("div", { class: "result", "aria-live": "polite" });
  const drawLocks = async () => {
    try {
      const { locks } = await api.get(`${base}/locks`);
      const stale = locks.filter((l) => l.stale).length;
      replace(locksEl,
        table([t("col.lock"), t("col.operation"), t("col.holder"), t("col.since"), t("col.status")],
          locks.map((l) => [
            h("code", { title: l.name }, `${l.name.slice(0, 12)}…`),
            l.lock ? `${l.lock.operation} (${l.lock.kind})` : "—",
            l.lock ? `${l.lock.user}@${l.lock.host} pid ${l.lock.pid}` : l.error || "—",
            l.lock ? relative(l.lock.created) : "—",
            l.stale ? badge("bad", t("health.stale", { why: l.stale })) : badge("ok", t("health.live")),
          ]),
          t("health.no_locks")),
        ctx.canChange && stale
          ? h("button", { type: "button", class: "unlock danger", onclick: async (ev) => {
              ev.target.disabled = true;
              try {
                const done = await api.post(`${base}/unlock`, {});
                replace(result, h("p", { role: "status" }, t("health.unlocked", { n: number(done.removed.length) })));
              } catch (e) {
                replace(result, errorBox(e));
              }
              drawLocks();
            } }, t("health.unlock", { n: number(stale) }))
          : "");
    } catch (e) {
      replace(locksEl, errorBox(e));
    }
  };
  const checksEl = h("div", { class: "checks-history" });
  const drawChecks = async () => {
    try {
      const { checks } = await api.get(`${base}/checks?limit=10`);
      const last = checks[0];
      replace(checksEl,
        h("p", { class: "last-check" }, last
          ? [last.ok ? badge("ok", t("health.check_ok")) : badge("bad", t("health.check_failed")), " ",
             t("health.last_check", { when: relative(last.at), how: last.how, by: last.by })]
          : badge("warn", t("health.never_checked"))),
        checks.length > 1
          ? table([t("col.when"), t("health.how"), t("col.status"), t("health.problems"), t("health.by")],
              checks.map((c) => [date(c.at), c.how, c.ok ? badge("ok", t("health.check_ok")) : badge("bad", t("health.check_failed")),
                c.problems == null ? "—" : number(c.problems), c.by]), "")
          : "");
    } catch (e) {
      replace(checksEl, errorBox(e));
    }
  };
  await Promise.all([drawLocks(), drawChecks()]);
  const busy = (btn, f) => async () => {
    btn.disabled = true;
    replace(result, h("p", { role: "status" }, t("health.working")));
    try {
      await f();
    } catch (e) {
      replace(result, errorBox(e));
    }
    btn.disabled = false;
  };
  const check = h("button", { type: "button", class: "check" }, t("health.check"));
  check.addEventListener("click", busy(check, async () => {
    const c = await api.post(`${base}/check`, {});
    const rep = c.report;
    replace(result,
      h("p", { class: "check-result" }, c.ok ? badge("ok", t("health.check_ok")) : badge("bad", t("health.check_bad", { n: number(rep.problems.length) })), " ",
        t("health.check_figures", { snapshots: number(rep.snapshots), packs: number(rep.packs), at: date(new Date()) })),
      rep.problems.length ? h("ul", {}, rep.problems.slice(0, 50).map((p) => h("li", {}, typeof p === "string" ? p : JSON.stringify(p)))) : "");
    drawChecks();
  }));
  const prune = h("button", { type: "button", class: "prune-preview" }, t("health.prune_preview"));
  prune.addEventListener("click", busy(prune, async () => {
    const plan = (await api.post(`${base}/prune`, { dry_run: true })).report;
    const go = h("button", { type: "button", class: "prune-go danger", onclick: busy(prune, async () => {
      go.disabled = true;
      const done = (await api.post(`${base}/prune`, { dry_run: false })).report;
      replace(result, h("p", { role: "status", class: "prune-done" }, t("health.pruned", { freed: bytes(done.bytes_freed), packs: number(done.packs_deleted + done.packs_repacked) })));
    }) }, t("health.prune_go"));
    replace(result,
      h("dl", { class: "facts prune-plan" },
        h("dt", {}, t("health.total")), h("dd", {}, bytes(plan.bytes_total)),
        h("dt", {}, t("health.unused")), h("dd", {}, bytes(plan.bytes_unused)),
        h("dt", {}, t("health.would_delete")), h("dd", {}, t("health.packs", { n: number(plan.packs_deleted) })),
        h("dt", {}, t("health.would_repack")), h("dd", {}, t("health.packs", { n: number(plan.packs_repacked) })),
        h("dt", {}, t("health.would_free")), h("dd", { class: "would-free" }, bytes(plan.bytes_freed))),
      (plan.warnings || []).map((w) => h("p", { class: "warn" }, w)),
      go);
  }));
  return h("section", { class: "repo-health", "data-repo": r.name },
    h("h2", {}, t("overview.repository", { name: r.name })),
    r.status === "ok"
      ? h("p", {}, bytes(r.figures.size_bytes), " · ", t("overview.repo_figures", { snapshots: number(r.figures.snapshots), dedup: number(r.figures.dedup_ratio, 1), compression: number(r.figures.compression_ratio, 1) }))
      : errorBox({ message: r.error }),
    h("h3", {}, t("health.checks")),
    checksEl,
    h("h3", {}, t("health.locks")),
    locksEl,
    ctx.canChange ? h("p", { class: "actions" }, check, " ", prune) : "",
    result);
}
