// Instant recovery from the dashboard (#/recover/<repository>/<snapshot>): start a
// database or a VM from a snapshot and watch it come up, then its connection string
// with a copy button. The sessions stay in the task bar on every page.

import * as api from "./api.js";
import { h, replace, errorBox } from "./dom.js";
import { t, date, seconds } from "./i18n.js";

const enc = encodeURIComponent;

/** A connection string in a read-only field with a copy button. */
export function connectionBox(id, connection) {
  const input = h("input", { id, class: "connection", readonly: true, value: connection, size: Math.min(connection.length, 70),
    "aria-label": t("recover.connection") });
  const done = h("span", { role: "status", class: "copied" });
  const copy = async () => {
    input.select();
    try {
      await navigator.clipboard.writeText(connection);
    } catch {
      document.execCommand("copy");
    }
    replace(done, t("recover.copied"));
  };
  return h("span", { class: "connection-box" }, input, h("button", { type: "button", id: `${id}-copy`, class: "secondary", onclick: copy }, t("recover.copy")), done);
}

export async function recoverPage(main, ctx, repo, id) {
  if (!ctx.canChange) throw new Error(t("form.read_only"));
  const all = (await api.get(`/repositories/${enc(repo)}/snapshots?limit=100000`)).snapshots;
  const snap = all.find((s) => s.id === id || s.id.startsWith(id));
  if (!snap) throw new Error(t("recover.no_snapshot", { id }));
  const isDb = snap.database && snap.database.method === "physical";
  if (!isDb && !snap.vm) throw new Error(t("recover.not_recoverable"));
  const status = h("p", { id: "rec-status", role: "status", "aria-live": "polite" });
  const result = h("div", { id: "rec-result" });
  const writable = h("input", { type: "checkbox", id: "rec-writable" });
  const runtime = h("select", { id: "rec-runtime" }, ["docker", "process"].map((r) => h("option", { value: r }, t(`recover.runtime_${r}`))));
  const options = isDb
    ? [h("label", { class: "check", for: "rec-writable" }, writable, " ", t("recover.writable")),
       h("div", { class: "field" }, h("label", { for: "rec-runtime" }, t("recover.runtime")), runtime)]
    : [h("p", { class: "hint" }, t("recover.vm_isolated"))];
  const start = async (ev) => {
    ev.target.disabled = true;
    replace(result);
    const began = Date.now();
    const tick = () => replace(status, t("recover.starting", { s: seconds((Date.now() - began) / 1000) }));
    tick();
    const timer = setInterval(tick, 1000);
    ctx.onLeave(() => clearInterval(timer));
    try {
      const body = isDb
        ? { repository: repo, snapshot: snap.id, writable: writable.checked, runtime: runtime.value }
        : { repository: repo, snapshot: snap.id };
      const r = await api.post(isDb ? "/recovery/db" : "/recovery/vm", body);
      clearInterval(timer);
      replace(status, h("span", { class: "ok", id: "rec-up" }, t("recover.up", { s: seconds((Date.now() - began) / 1000) })));
      replace(result,
        r.connection ? [h("p", {}, t("recover.connect_with")), connectionBox("rec-connection", r.connection)] : "",
        r.session && r.session.domain ? h("p", {}, t("recover.domain", { name: r.session.domain })) : "",
        h("p", { class: "hint" }, t("recover.in_taskbar")));
      ctx.refreshTaskbar();
    } catch (e) {
      clearInterval(timer);
      replace(status);
      replace(result, errorBox(e));
      ev.target.disabled = false;
    }
  };
  replace(
    main,
    h("h1", {}, isDb ? t("recover.db_title", { source: snap.source }) : t("recover.vm_title", { source: snap.vm })),
    h("dl", { class: "facts" },
      h("dt", {}, t("col.snapshot")), h("dd", {}, h("code", {}, snap.id.slice(0, 8))),
      h("dt", {}, t("col.time")), h("dd", {}, date(snap.time)),
      h("dt", {}, t("col.host")), h("dd", {}, snap.host),
      isDb ? [h("dt", {}, t("recover.engine")), h("dd", {}, snap.database.engine)] : ""),
    options,
    h("div", { class: "actions" }, h("button", { type: "button", id: "rec-start", onclick: start }, t("recover.start"))),
    status,
    result,
  );
}
