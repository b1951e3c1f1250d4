// Verifications in the dashboard: "verify now" on a snapshot's row (the API answers when
// the VM has booted and been checked, the database started and checked, or the sample
// restored and compared), and the host's results on the health page: totals, success
// rate, the latest verifications with the step that failed.

import * as api from "./api.js";
import { h, table, badge, replace, errorBox } from "./dom.js";
import { t, date, number } from "./i18n.js";

const BADGE = { passed: "ok", warning: "warn", failed: "bad", running: "warn", pending: "warn" };

function statusBadge(status) {
  return badge(BADGE[status] || "warn", t(`verify.status.${status}`));
}

function seconds(s) {
  return s == null ? "—" : `${number(s, 1)} s`;
}

/** The first failed step's name, or a dash. */
function failedStep(v) {
  const s = (v.steps || []).find((x) => x.result === "failed");
  return s ? s.name : "—";
}

/** One verification: its status, what it proved, every step timed. */
export function verificationView(v) {
  return h("div", { class: "verification", "data-status": v.status, "data-id": v.id },
    h("p", { class: "verify-status" }, statusBadge(v.status), " ",
      t("verify.summary", { id: v.id, kind: v.kind, test: v.test, snapshot: v.snapshot.slice(0, 8), seconds: seconds(v.seconds) })),
    v.error ? h("p", { class: "error" }, v.error) : "",
    table([t("verify.step"), t("col.status"), t("verify.duration"), t("verify.detail")],
      (v.steps || []).map((s) => [s.name, statusBadge(s.result), seconds(s.seconds), (s.detail || "").split("\n")[0]]),
      ""));
}

/** A "verify now" button for snapshot `id` of `repo`; its result goes into `box`. */
export function verifyButton(repo, id, box) {
  return h("button", { type: "button", class: "verify", "data-snapshot": id, onclick: async (ev) => {
    ev.target.disabled = true;
    replace(box, h("p", { role: "status", class: "verifying" }, t("verify.running", { id: id.slice(0, 8) })));
    try {
      const { verification } = await api.post("/verifications", { repository: repo, snapshot: id });
      replace(box, verificationView(verification));
    } catch (e) {
      replace(box, errorBox(e));
    }
    ev.target.disabled = false;
  } }, t("verify.action"));
}

/** The health page's section: totals and the latest verifications. */
export async function verificationsSection() {
  const el = h("section", { class: "verifications" }, h("h2", {}, t("verify.title")));
  try {
    const [{ stats }, { verifications }] = await Promise.all([
      api.get("/verifications/stats"),
      api.get("/verifications?limit=20"),
    ]);
    el.append(
      h("p", { class: "verify-totals" }, t("verify.totals", {
        total: number(stats.total), passed: number(stats.passed), failed: number(stats.failed),
        rate: stats.success_rate == null ? "—" : `${number(stats.success_rate * 100, 0)} %`,
        average: seconds(stats.average_seconds),
      })),
      table([t("col.when"), t("col.status"), t("verify.test"), t("col.source"), t("col.snapshot"), t("verify.trigger"), t("verify.duration"), t("verify.failed_step")],
        verifications.map((v) => [
          date(v.finished || v.created), statusBadge(v.status), `${v.kind} ${v.test}`, v.source,
          h("code", { title: v.snapshot }, v.snapshot.slice(0, 8)), v.trigger, seconds(v.seconds),
          h("span", { title: v.error || "" }, failedStep(v)),
        ]),
        t("verify.none")));
  } catch (e) {
    el.append(errorBox(e));
  }
  return el;
}
